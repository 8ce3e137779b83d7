//! Key-value writing shared by CEF and LEEF: escaping, custom keys, key
//! collisions, and shortening a message to a byte budget.
//!
//! Escaping is done while writing, so every `\` in written text starts a
//! two-byte escape sequence. [`safe_cut`] relies on that to cut a message
//! without splitting an escape or a UTF-8 sequence.

use std::borrow::Cow;

use crate::detection::Detection;

/// Prefix given to a custom key that equals a key the mapping writes.
pub const COLLISION_PREFIX: &str = "mde";

/// The byte ranges of one written `key=value` pair, recorded only when a
/// message may have to be shortened.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    start: usize,
    value_start: usize,
    value_end: usize,
    /// End of the entry, after a label pair such as ` cs1Label=ThreatName`.
    end: usize,
    /// Identifying entries are truncated last and never dropped for size
    /// unless nothing else is left.
    keep: bool,
    /// The value is a number, timestamp or address, which is dropped rather
    /// than cut: a cut one still looks valid (`rt=17964612`).
    whole: bool,
    /// The detection's FullId, which a SIEM needs to match the event: the
    /// last identifying entry to be truncated.
    primary: bool,
}

impl Entry {
    pub fn start(&self) -> usize {
        self.start
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn value_len(&self) -> usize {
        self.value_end - self.value_start
    }
}

/// The escaping rules of one format's values.
#[derive(Clone, Copy, Debug)]
pub enum ValueEscape {
    /// `\` → `\\`, `=` → `\=`, CR → `\r`, LF → `\n`.
    Cef,
    /// `\` → `\\`, tab → `\t`, CR → `\r`, LF → `\n`.
    Leef,
}

impl ValueEscape {
    /// Returns the four bytes that need an escape in this format.
    fn specials(self) -> [u8; 4] {
        match self {
            Self::Cef => [b'\\', b'\r', b'\n', b'='],
            Self::Leef => [b'\\', b'\r', b'\n', b'\t'],
        }
    }
}

/// Returns the two-byte escape of a special byte: `\` and the byte itself,
/// or the letter of a control character (`\r`, `\n`, `\t`).
fn escaped(byte: u8) -> [u8; 2] {
    let letter = match byte {
        b'\r' => b'r',
        b'\n' => b'n',
        b'\t' => b't',
        other => other,
    };
    [b'\\', letter]
}

/// Returns the index of the first byte of `bytes` that is one of `specials`:
/// sixteen bytes at a time with SSE2, which every x86_64 processor has, and
/// eight at a time elsewhere.
fn find_special<const N: usize>(bytes: &[u8], specials: [u8; N]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    {
        find_special_sse2(bytes, specials)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        find_special_swar(bytes, specials)
    }
}

/// [`find_special`] with SSE2. The last partial block is copied into a
/// zeroed block first, which cannot match because no format escapes NUL.
#[cfg(target_arch = "x86_64")]
fn find_special_sse2<const N: usize>(bytes: &[u8], specials: [u8; N]) -> Option<usize> {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
        _mm_setzero_si128,
    };
    debug_assert!(!specials.contains(&0));
    let mut chunks = bytes.chunks_exact(16);
    let mut tail = [0u8; 16];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    let mut offset = 0;
    // SAFETY: SSE2 is part of the x86_64 baseline, so these intrinsics are
    // always available, and each load reads one whole 16-byte array.
    unsafe {
        let needles = specials.map(|byte| _mm_set1_epi8(byte as i8));
        let mask_of = |block: *const u8| {
            let block = _mm_loadu_si128(block.cast::<__m128i>());
            let special = needles.iter().fold(_mm_setzero_si128(), |special, &needle| {
                _mm_or_si128(special, _mm_cmpeq_epi8(block, needle))
            });
            _mm_movemask_epi8(special) as u32
        };
        for chunk in &mut chunks {
            let mask = mask_of(chunk.as_ptr());
            if mask != 0 {
                return Some(offset + mask.trailing_zeros() as usize);
            }
            offset += 16;
        }
        let mask = mask_of(tail.as_ptr());
        (mask != 0).then(|| offset + mask.trailing_zeros() as usize)
    }
}

/// [`find_special`] eight bytes at a time in plain integers. For a word `w`
/// and a byte `b`, the expression `(x - 0x01..01) & !x & 0x80..80` with
/// `x = w ^ b*0x01..01` sets the top bit of every zero byte of `x`. A borrow
/// can also flag a byte above a real match, never below, so the lowest flag
/// is always a true match.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn find_special_swar<const N: usize>(bytes: &[u8], specials: [u8; N]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let matches = |word: u64, byte: u8| {
        let x = word ^ (ONES * u64::from(byte));
        x.wrapping_sub(ONES) & !x & HIGHS
    };
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
        let flags = specials.iter().fold(0, |flags, &byte| flags | matches(word, byte));
        if flags != 0 {
            return Some(offset + flags.trailing_zeros() as usize / 8);
        }
        offset += 8;
    }
    chunks.remainder().iter().position(|b| specials.contains(b)).map(|i| offset + i)
}

/// Appends `text` with the value escapes of one format.
pub fn escape_value(text: &str, escape: ValueEscape, out: &mut Vec<u8>) {
    let specials = escape.specials();
    let mut rest = text.as_bytes();
    while let Some(i) = find_special(rest, specials) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(&escaped(rest[i]));
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// Returns whether `text` has a CR or LF, which [`escape_header`] turns
/// into a space.
pub fn has_line_break(text: &str) -> bool {
    memchr::memchr2(b'\r', b'\n', text.as_bytes()).is_some()
}

/// Appends a header field: `\` → `\\`, `|` → `\|`, and a line break (CR, LF
/// or CRLF) becomes one space. With `tab_to_space` a tab becomes a space too.
pub fn escape_header(text: &str, tab_to_space: bool, out: &mut Vec<u8>) {
    if tab_to_space {
        escape_header_bytes(text, [b'\\', b'|', b'\r', b'\n', b'\t'], out);
    } else {
        escape_header_bytes(text, [b'\\', b'|', b'\r', b'\n'], out);
    }
}

/// [`escape_header`] for a set of special bytes: the escapes and CR, LF and
/// possibly tab, which become spaces.
fn escape_header_bytes<const N: usize>(text: &str, specials: [u8; N], out: &mut Vec<u8>) {
    let mut rest = text.as_bytes();
    while let Some(i) = find_special(rest, specials) {
        out.extend_from_slice(&rest[..i]);
        let mut special_len = 1;
        match rest[i] {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'|' => out.extend_from_slice(b"\\|"),
            b'\r' => {
                out.push(b' ');
                if rest.get(i + 1) == Some(&b'\n') {
                    special_len = 2;
                }
            }
            _ => out.push(b' '),
        }
        rest = &rest[i + special_len..];
    }
    out.extend_from_slice(rest);
}

/// Returns whether `name` can be written as a key: plain ASCII letters and
/// digits, at least one.
pub fn is_plain_key(name: &str) -> bool {
    !name.is_empty() && is_alphanumeric(name.as_bytes())
}

/// Returns whether every byte of `bytes` is an ASCII letter or digit:
/// sixteen bytes at a time with SSE2 on x86_64, one at a time elsewhere.
fn is_alphanumeric(bytes: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_alphanumeric_sse2(bytes)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        bytes.iter().all(u8::is_ascii_alphanumeric)
    }
}

/// [`is_alphanumeric`] with SSE2. A byte `b` is a letter when `b | 0x20` is
/// in `a..=z`, and the signed compares reject bytes of 0x80 and above, which
/// are negative as `i8`. The last partial block is padded with `0`.
#[cfg(target_arch = "x86_64")]
fn is_alphanumeric_sse2(bytes: &[u8]) -> bool {
    use std::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpgt_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let mut chunks = bytes.chunks_exact(16);
    let mut tail = [b'0'; 16];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    // SAFETY: SSE2 is part of the x86_64 baseline, so these intrinsics are
    // always available, and each load reads one whole 16-byte array.
    unsafe {
        let case_bit = _mm_set1_epi8(0x20);
        let before_a = _mm_set1_epi8((b'a' - 1) as i8);
        let after_z = _mm_set1_epi8((b'z' + 1) as i8);
        let before_0 = _mm_set1_epi8((b'0' - 1) as i8);
        let after_9 = _mm_set1_epi8((b'9' + 1) as i8);
        let all_plain = |block: *const u8| {
            let block = _mm_loadu_si128(block.cast::<__m128i>());
            let lower = _mm_or_si128(block, case_bit);
            let letter = _mm_and_si128(_mm_cmpgt_epi8(lower, before_a), _mm_cmpgt_epi8(after_z, lower));
            let digit = _mm_and_si128(_mm_cmpgt_epi8(block, before_0), _mm_cmpgt_epi8(after_9, block));
            _mm_movemask_epi8(_mm_or_si128(letter, digit)) == 0xFFFF
        };
        chunks.all(|chunk| all_plain(chunk.as_ptr())) && all_plain(tail.as_ptr())
    }
}

/// Writes `key=value` pairs with one separator between them and records
/// their ranges when asked to.
pub struct ExtensionWriter<'a> {
    out: &'a mut Vec<u8>,
    separator: u8,
    escape: ValueEscape,
    pairs: usize,
    entries: Option<&'a mut Vec<Entry>>,
    /// Custom keys left out because their names are not plain.
    pub dropped_keys: u32,
}

impl<'a> ExtensionWriter<'a> {
    pub fn new(
        out: &'a mut Vec<u8>,
        separator: u8,
        escape: ValueEscape,
        entries: Option<&'a mut Vec<Entry>>,
    ) -> Self {
        Self {
            out,
            separator,
            escape,
            pairs: 0,
            entries,
            dropped_keys: 0,
        }
    }

    /// Writes `key=` and the escaped `value`, then `labelKey=label` when a
    /// label is given, as one entry.
    pub fn text(&mut self, key: &str, value: &str, label: Option<(&str, &str)>, keep: bool) {
        self.pair(key, label, keep, false, |out, escape| {
            escape_value(value, escape, out)
        });
    }

    /// Writes a text value that shortening must not cut, such as an IP
    /// address, as [`ExtensionWriter::text`] does.
    pub fn whole_text(&mut self, key: &str, value: &str, label: Option<(&str, &str)>, keep: bool) {
        self.pair(key, label, keep, true, |out, escape| {
            escape_value(value, escape, out)
        });
    }

    /// Writes `key=` and a decimal number, then the label if given.
    pub fn number(&mut self, key: &str, value: i64, label: Option<(&str, &str)>, keep: bool) {
        self.pair(key, label, keep, true, |out, _| write_integer(value, out));
    }

    /// Writes a field that has no mapped key under its own name.
    ///
    /// A name that is not plain ASCII letters and digits is dropped and
    /// counted. A name for which `is_reserved` is true gets [`COLLISION_PREFIX`]
    /// in front, repeated until the key is neither reserved nor the name of
    /// another field of `d`, so no two pairs of one event share a key.
    ///
    /// An identifying (`keep`) value that is a timestamp is written whole
    /// (see [`ExtensionWriter::whole_text`]), so shortening never cuts it
    /// into an earlier, still valid time.
    pub fn custom(
        &mut self,
        d: &Detection,
        name: &str,
        value: &str,
        is_reserved: fn(&str) -> bool,
        keep: bool,
    ) {
        if !is_plain_key(name) {
            self.dropped_keys += 1;
            return;
        }
        let key = unique_custom_key(d, name, is_reserved);
        if keep && crate::timefmt::parse(value).is_some() {
            self.whole_text(&key, value, None, keep);
        } else {
            self.text(&key, value, None, keep);
        }
    }

    /// Writes `key=`, then calls `write_value`, which must apply the value
    /// escapes itself, then the label if given. A `whole` value is dropped
    /// rather than cut when the message must be shortened.
    pub fn pair(
        &mut self,
        key: &str,
        label: Option<(&str, &str)>,
        keep: bool,
        whole: bool,
        write_value: impl FnOnce(&mut Vec<u8>, ValueEscape),
    ) {
        if self.pairs > 0 {
            self.out.push(self.separator);
        }
        self.pairs += 1;

        let start = self.out.len();
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'=');
        let value_start = self.out.len();
        write_value(self.out, self.escape);
        let value_end = self.out.len();

        if let Some((label_key, label)) = label {
            self.out.push(self.separator);
            self.out.extend_from_slice(label_key.as_bytes());
            self.out.push(b'=');
            escape_value(label, self.escape, self.out);
        }

        if let Some(entries) = self.entries.as_deref_mut() {
            entries.push(Entry {
                start,
                value_start,
                value_end,
                end: self.out.len(),
                keep,
                whole,
                primary: false,
            });
        }
    }

    /// Calls `write` and marks the pairs it writes as the detection's
    /// FullId, which shortening truncates only after every other
    /// identifying pair. A FullId that is a number is dropped rather than
    /// cut, because a cut one is another valid number.
    pub fn primary(&mut self, write: impl FnOnce(&mut Self)) {
        let first = self.entries.as_deref().map_or(0, Vec::len);
        write(self);
        if let Some(entries) = self.entries.as_deref_mut() {
            for entry in &mut entries[first..] {
                entry.primary = true;
                let value = &self.out[entry.value_start..entry.value_end];
                entry.whole |= !value.is_empty() && value.iter().all(|b| b"0123456789+-.eE".contains(b));
            }
        }
    }
}

/// Appends `value` in decimal without allocating.
pub fn write_integer(value: i64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut rest = value.unsigned_abs();
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if value < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[start..]);
}

fn unique_custom_key<'n>(
    d: &Detection,
    name: &'n str,
    is_reserved: fn(&str) -> bool,
) -> Cow<'n, str> {
    if !is_reserved(name) {
        return Cow::Borrowed(name);
    }
    let mut key = format!("{COLLISION_PREFIX}{name}");
    while is_reserved(&key) || d.has_field(&key) {
        key.insert_str(0, COLLISION_PREFIX);
    }
    Cow::Owned(key)
}

/// Returns the largest length not above `max` at which `bytes` can be cut
/// without splitting a UTF-8 sequence or a backslash escape.
///
/// `json` selects JSON string escapes, where `\uXXXX` is six bytes long,
/// and a surrogate pair such as `\ud83d\ude00` (one character) twelve;
/// otherwise every escape is two bytes.
pub fn safe_cut(bytes: &[u8], max: usize, json: bool) -> usize {
    let mut i = 0;
    while i < bytes.len() {
        let token = match bytes[i] {
            b'\\' if json && bytes.get(i + 1) == Some(&b'u') => {
                if is_surrogate_escape(&bytes[i..], 0xD800) && is_surrogate_escape(bytes.get(i + 6..).unwrap_or_default(), 0xDC00) {
                    12
                } else {
                    6
                }
            }
            b'\\' => 2,
            byte => utf8_sequence_len(byte),
        };
        if i + token > max {
            break;
        }
        i += token;
    }
    i.min(bytes.len())
}

/// Returns whether `bytes` starts with a `\uXXXX` escape whose code unit
/// lies in the 1024 surrogates from `first` (0xD800 high, 0xDC00 low).
fn is_surrogate_escape(bytes: &[u8], first: u16) -> bool {
    let Some(hex) = bytes.get(2..6).filter(|_| bytes.starts_with(b"\\u")) else {
        return false;
    };
    let unit = std::str::from_utf8(hex).ok().and_then(|hex| u16::from_str_radix(hex, 16).ok());
    unit.is_some_and(|unit| (first..first + 0x400).contains(&unit))
}

fn utf8_sequence_len(first_byte: u8) -> usize {
    match first_byte {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

/// Rewrites the message that starts at `message_start` so that it is at most
/// `budget` bytes long.
///
/// The message is the fixed part up to `extension_start` (syslog header and
/// format header) followed by `entries` joined by `separator`. The steps:
/// 1. drop optional entries, longest first, until the message fits;
/// 2. drop identifying entries other than the FullId, from the last one,
///    because a cut host name or ID still looks valid;
/// 3. when the FullId alone does not fit, cut its value at a safe boundary,
///    or drop it when no part of it fits;
/// 4. put back dropped identifying entries that fit again;
/// 5. when the fixed part alone is too long, cut it at a safe boundary.
///
/// Returns what the shortened message kept whole.
pub fn shorten(
    out: &mut Vec<u8>,
    message_start: usize,
    extension_start: usize,
    entries: &[Entry],
    separator: u8,
    budget: usize,
) -> WholeParts {
    let fixed_len = extension_start - message_start;
    let mut plan = Plan::new(entries, fixed_len);

    plan.drop_optional_longest_first(entries, budget);
    let dropped = plan.drop_identifying_from_last(entries, budget);
    if plan.total > budget {
        plan.cut_full_id(out, entries, budget);
    }
    plan.put_back(entries, &dropped, budget);

    let mut message = Vec::with_capacity(budget);
    message.extend_from_slice(&out[message_start..extension_start]);
    let mut first = true;
    for (entry, action) in entries.iter().zip(&plan.actions) {
        let value_len = match action {
            Action::Drop => continue,
            Action::Keep => entry.value_len(),
            Action::Truncate(len) => *len,
        };
        if !first {
            message.push(separator);
        }
        first = false;
        message.extend_from_slice(&out[entry.start..entry.value_start + value_len]);
        message.extend_from_slice(&out[entry.value_end..entry.end]);
    }

    let mut whole = WholeParts {
        full_id: entries.iter().zip(&plan.actions).all(|(entry, action)| !entry.primary || *action == Action::Keep),
        header: true,
    };
    if message.len() > budget {
        // NOTE: only reached when the syslog and format headers alone exceed
        // the budget. The cut message is no longer valid CEF or LEEF.
        let cut = safe_cut(&message, budget, false);
        message.truncate(cut);
        whole = WholeParts { full_id: false, header: false };
    }

    out.truncate(message_start);
    out.extend_from_slice(&message);
    whole
}

/// The parts of a message that [`shorten`] kept whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WholeParts {
    /// The FullId entry, or true when the detection has none.
    pub full_id: bool,
    /// The syslog and format headers, so the message is still valid CEF or
    /// LEEF.
    pub header: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Keep,
    Drop,
    /// Keep the first this many bytes of the escaped value.
    Truncate(usize),
}

/// The shortening decision for each entry, with the resulting message length.
struct Plan {
    actions: Vec<Action>,
    total: usize,
    remaining: usize,
}

impl Plan {
    fn new(entries: &[Entry], fixed_len: usize) -> Self {
        let entries_len: usize = entries.iter().map(Entry::len).sum();
        let separators = entries.len().saturating_sub(1);
        Self {
            actions: vec![Action::Keep; entries.len()],
            total: fixed_len + entries_len + separators,
            remaining: entries.len(),
        }
    }

    fn drop_entry(&mut self, index: usize, entry: &Entry) {
        self.actions[index] = Action::Drop;
        // Each entry but the only one left brings one separator with it.
        self.total -= entry.len() + usize::from(self.remaining > 1);
        self.remaining -= 1;
    }

    fn drop_optional_longest_first(&mut self, entries: &[Entry], budget: usize) {
        let mut optional: Vec<usize> = (0..entries.len()).filter(|&i| !entries[i].keep).collect();
        optional.sort_by_key(|&i| std::cmp::Reverse(entries[i].len()));
        for i in optional {
            if self.total <= budget {
                return;
            }
            self.drop_entry(i, &entries[i]);
        }
    }

    /// Drops kept entries other than the FullId, from the last one, until
    /// the message fits. Returns the dropped entries' indexes.
    fn drop_identifying_from_last(&mut self, entries: &[Entry], budget: usize) -> Vec<usize> {
        let mut dropped = Vec::new();
        for i in (0..entries.len()).rev() {
            if self.total <= budget {
                break;
            }
            if self.actions[i] == Action::Drop || entries[i].primary {
                continue;
            }
            self.drop_entry(i, &entries[i]);
            dropped.push(i);
        }
        dropped
    }

    /// Cuts the value of the FullId entry where part of it fits the
    /// budget, and drops it where none does (or where it is a number).
    fn cut_full_id(&mut self, out: &[u8], entries: &[Entry], budget: usize) {
        for (i, entry) in entries.iter().enumerate().rev() {
            if self.total <= budget {
                break;
            }
            if self.actions[i] == Action::Drop || !entry.primary {
                continue;
            }
            let excess = self.total - budget;
            let value = &out[entry.value_start..entry.value_end];
            let cut = safe_cut(value, value.len().saturating_sub(excess), false);
            if !entry.whole && excess < value.len() && cut > 0 {
                self.actions[i] = Action::Truncate(cut);
                self.total -= value.len() - cut;
            } else {
                self.drop_entry(i, entry);
            }
        }
    }

    /// Puts back the `dropped` entries that fit again: dropping a long
    /// entry may free more room than was missing.
    fn put_back(&mut self, entries: &[Entry], dropped: &[usize], budget: usize) {
        for &i in dropped.iter().rev() {
            let added = entries[i].len() + usize::from(self.remaining > 0);
            if self.total + added <= budget {
                self.actions[i] = Action::Keep;
                self.total += added;
                self.remaining += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Escapes byte by byte, the plain reading of the rules.
    fn escape_slowly(text: &str, escape: ValueEscape) -> Vec<u8> {
        let mut out = Vec::new();
        for &byte in text.as_bytes() {
            if escape.specials().contains(&byte) {
                out.extend_from_slice(&escaped(byte));
            } else {
                out.push(byte);
            }
        }
        out
    }

    #[test]
    fn escape_value_table() {
        for (text, cef, leef) in [
            ("", "", ""),
            ("plain text", "plain text", "plain text"),
            ("a=b", r"a\=b", "a=b"),
            ("C:\\Windows\\x", r"C:\\Windows\\x", r"C:\\Windows\\x"),
            ("line1\r\nline2\n", r"line1\r\nline2\n", r"line1\r\nline2\n"),
            ("tab\there", "tab\there", r"tab\there"),
            ("==\\\\", r"\=\=\\\\", r"==\\\\"),
            ("名前=値", r"名前\=値", "名前=値"),
        ] {
            let mut out = Vec::new();
            escape_value(text, ValueEscape::Cef, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), cef, "CEF {text:?}");
            let mut out = Vec::new();
            escape_value(text, ValueEscape::Leef, &mut out);
            assert_eq!(String::from_utf8(out).unwrap(), leef, "LEEF {text:?}");
        }
    }

    #[test]
    fn escape_value_matches_bytewise_escaping() {
        // Every ASCII byte at every offset of a 37-byte string, so each one
        // lands in every lane of a 16-byte block, of a word and of the tail,
        // next to neighbours that differ from a special byte by one.
        for byte in 0u8..=127 {
            for offset in 0..37 {
                let mut bytes = vec![b'a'; 37];
                bytes[offset] = byte;
                if offset + 1 < bytes.len() {
                    bytes[offset + 1] = byte.wrapping_add(1) & 0x7f;
                }
                let text = String::from_utf8(bytes).unwrap();
                for escape in [ValueEscape::Cef, ValueEscape::Leef] {
                    let mut out = Vec::new();
                    escape_value(&text, escape, &mut out);
                    assert_eq!(out, escape_slowly(&text, escape), "{escape:?} {text:?}");

                    let specials = escape.specials();
                    let first = text.bytes().position(|b| specials.contains(&b));
                    assert_eq!(find_special_swar(text.as_bytes(), specials), first, "SWAR {escape:?} {text:?}");
                }
            }
        }
    }

    #[test]
    fn safe_cut_keeps_escape_pairs_whole() {
        let escaped = br"a\=b\\c";
        let boundaries: Vec<usize> = (0..=escaped.len())
            .map(|max| safe_cut(escaped, max, false))
            .collect();
        assert_eq!(boundaries, vec![0, 1, 1, 3, 4, 4, 6, 7]);
    }

    #[test]
    fn safe_cut_keeps_utf8_sequences_whole() {
        let text = "a使b".as_bytes();
        let boundaries: Vec<usize> = (0..=text.len())
            .map(|max| safe_cut(text, max, false))
            .collect();
        assert_eq!(boundaries, vec![0, 1, 1, 1, 4, 5]);
    }

    #[test]
    fn safe_cut_keeps_surrogate_pairs_whole() {
        let text = br#"ab\ud83d\ude00c"#;
        for max in 2..14 {
            assert_eq!(safe_cut(text, max, true), 2, "max {max}");
        }
        assert_eq!(safe_cut(text, 14, true), 14);
        // A lone high surrogate is a six-byte escape of its own.
        assert_eq!(safe_cut(br#"\ud83dx"#, 6, true), 6);
    }

    #[test]
    fn safe_cut_keeps_json_unicode_escapes_whole() {
        let text = br"a\u0001b";
        assert_eq!(safe_cut(text, 6, true), 1);
        assert_eq!(safe_cut(text, 7, true), 7);
    }

    /// Escapes a header field byte by byte, the plain reading of the rules.
    fn escape_header_slowly(text: &str, tab_to_space: bool) -> Vec<u8> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'|' => out.extend_from_slice(b"\\|"),
                b'\r' => {
                    out.push(b' ');
                    if bytes.get(i + 1) == Some(&b'\n') {
                        i += 1;
                    }
                }
                b'\n' => out.push(b' '),
                b'\t' if tab_to_space => out.push(b' '),
                other => out.push(other),
            }
            i += 1;
        }
        out
    }

    #[test]
    fn escape_header_matches_bytewise_escaping() {
        // Every ASCII byte at every offset, followed by the next byte value
        // or by LF, so CRLF and CR alone land in every lane and in the tail.
        for byte in 0u8..=127 {
            for next in [byte.wrapping_add(1) & 0x7f, b'\n'] {
                for offset in 0..37 {
                    let mut bytes = vec![b'a'; 37];
                    bytes[offset] = byte;
                    if offset + 1 < bytes.len() {
                        bytes[offset + 1] = next;
                    }
                    let text = String::from_utf8(bytes).unwrap();
                    for tab_to_space in [false, true] {
                        let mut out = Vec::new();
                        escape_header(&text, tab_to_space, &mut out);
                        assert_eq!(out, escape_header_slowly(&text, tab_to_space), "{tab_to_space} {text:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn escape_header_line_breaks_become_spaces() {
        let mut out = Vec::new();
        escape_header("a\r\nb\rc\nd\n\ne|f\\g\th", false, &mut out);
        assert_eq!(String::from_utf8_lossy(&out), "a b c d  e\\|f\\\\g\th");
    }

    #[test]
    fn alphanumeric_check_matches_bytewise_check() {
        // Every byte value at every offset of a 37-byte name, so each one
        // lands in every lane of a 16-byte block and in the tail.
        for byte in 0u8..=255 {
            for offset in 0..37 {
                let mut bytes = vec![b'a'; 37];
                bytes[offset] = byte;
                for len in [offset + 1, 37] {
                    let name = &bytes[..len];
                    let expected = name.iter().all(u8::is_ascii_alphanumeric);
                    assert_eq!(is_alphanumeric(name), expected, "{name:?}");
                }
            }
        }
    }

    #[test]
    fn plain_key_rejects_empty_and_punctuation() {
        assert!(is_plain_key("Abc123"));
        assert!(!is_plain_key(""));
        assert!(!is_plain_key("a b"));
        assert!(!is_plain_key("a=b"));
        assert!(!is_plain_key("a_b"));
        assert!(!is_plain_key("名前"));
    }
}
