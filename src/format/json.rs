//! JSON payload: the detection's object as the API sent it, on one line.
//!
//! The raw text is written unchanged when it has no line break, which keeps
//! number precision and key order. Pretty-printed input is compacted by
//! removing whitespace outside strings instead of re-serializing the parsed
//! fields, which would respell numbers (`1E400` as `1e+400`) and decode
//! escapes.

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::extension::safe_cut;
use crate::detection::{compact_json, Detection};

/// Fields kept when a message is shortened, because they identify the
/// detection and its place in the stream.
const PROTECTED_FIELDS: [&str; 4] = ["FullId", "AlertId", "LastProcessedTimeUtc", "AlertTime"];

/// Appends the detection's JSON object on one line.
///
/// A raw CR or LF in valid JSON can only be whitespace between tokens, since
/// JSON strings carry line breaks escaped, so compacting removes them all.
pub fn encode_json(d: &Detection, out: &mut Vec<u8>) {
    let raw = d.raw();
    if memchr::memchr2(b'\n', b'\r', raw.as_bytes()).is_some() {
        out.extend_from_slice(compact_json(raw).as_bytes());
    } else {
        out.extend_from_slice(raw.as_bytes());
    }
}

/// One `"key":value` member, compacted, as written in the output.
struct Member {
    text: Vec<u8>,
    /// Offset of the value inside `text`.
    value_start: usize,
    protected: bool,
    /// The member is `FullId`, which a SIEM needs to match the event: the
    /// last to be truncated or dropped.
    full_id: bool,
    is_string: bool,
}

/// The top-level members of an object in document order, values unparsed.
struct RawMembers<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawMembers<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for MembersVisitor<'a> {
            type Value = RawMembers<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'a RawValue>()? {
                    members.push(entry);
                }
                Ok(RawMembers(members))
            }
        }

        deserializer.deserialize_map(MembersVisitor(std::marker::PhantomData))
    }
}

/// Appends the detection's JSON so that the message starting at
/// `message_start` is at most `budget` bytes. The JSON stays valid, and is
/// left out when the header leaves no room for `{}`.
///
/// Unprotected members are dropped longest first. When the protected ones
/// still do not fit, their string values are truncated, longest first, at
/// boundaries that split no escape or UTF-8 sequence, and then the protected
/// members are dropped too. `FullId` comes last in both steps.
///
/// Returns false when a `FullId` member was truncated or dropped, or the
/// JSON left out.
pub(super) fn write_within(d: &Detection, out: &mut Vec<u8>, message_start: usize, budget: usize) -> bool {
    let header_len = out.len() - message_start;
    if header_len + 2 > budget {
        // NOTE: the header leaves no room for even `{}`, so the message is
        // the header cut to the budget, without any JSON.
        let cut = safe_cut(&out[message_start..], budget, false);
        out.truncate(message_start + cut);
        return false;
    }
    let json_budget = budget - header_len;

    let mut members = members_of(d);
    let mut total = object_len(&members);
    let full_id_before: Vec<Vec<u8>> = members.iter().filter(|m| m.full_id).map(|m| m.text.clone()).collect();

    drop_longest(&mut members, &mut total, json_budget, |m| !m.protected);
    truncate_protected_strings(&mut members, &mut total, json_budget);
    drop_longest(&mut members, &mut total, json_budget, |m| !m.full_id);
    drop_longest(&mut members, &mut total, json_budget, |_| true);
    let full_id_after: Vec<&Vec<u8>> = members.iter().filter(|m| m.full_id).map(|m| &m.text).collect();
    let full_id_whole = full_id_after.len() == full_id_before.len() && full_id_after.iter().zip(&full_id_before).all(|(after, before)| *after == before);

    out.push(b'{');
    for (i, member) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&member.text);
    }
    out.push(b'}');
    full_id_whole
}

fn members_of(d: &Detection) -> Vec<Member> {
    let Ok(RawMembers(raw_members)) = serde_json::from_str::<RawMembers<'_>>(d.raw()) else {
        // `Detection` accepts only JSON objects, so this branch is not
        // expected to run. An empty object still keeps the message valid.
        return Vec::new();
    };
    raw_members
        .into_iter()
        .map(|(key, value)| {
            let mut text = serde_json::to_vec(&key).unwrap_or_default();
            text.push(b':');
            let value_start = text.len();
            text.extend_from_slice(compact_json(value.get()).as_bytes());
            Member {
                protected: PROTECTED_FIELDS.contains(&key.as_str()),
                full_id: key == "FullId",
                is_string: value.get().starts_with('"'),
                text,
                value_start,
            }
        })
        .collect()
}

/// Length of `{` members joined by `,` `}`.
fn object_len(members: &[Member]) -> usize {
    2 + members.iter().map(|m| m.text.len()).sum::<usize>() + members.len().saturating_sub(1)
}

fn drop_longest(
    members: &mut Vec<Member>,
    total: &mut usize,
    budget: usize,
    may_drop: fn(&Member) -> bool,
) {
    while *total > budget {
        let longest = members
            .iter()
            .enumerate()
            .filter(|(_, m)| may_drop(m))
            .max_by_key(|(_, m)| m.text.len())
            .map(|(i, _)| i);
        let Some(i) = longest else { return };
        let member = members.remove(i);
        *total -= member.text.len() + usize::from(!members.is_empty());
    }
}

fn truncate_protected_strings(members: &mut [Member], total: &mut usize, budget: usize) {
    let mut order: Vec<usize> = (0..members.len())
        .filter(|&i| members[i].is_string)
        .collect();
    // Longest first, FullId after all others.
    order.sort_by_key(|&i| (members[i].full_id, std::cmp::Reverse(members[i].text.len())));
    for i in order {
        if *total <= budget {
            return;
        }
        let member = &mut members[i];
        // The string's content lies between the quotes at both ends.
        let content_start = member.value_start + 1;
        let content_len = member.text.len() - 1 - content_start;
        let excess = *total - budget;
        let target = content_len.saturating_sub(excess);
        let cut = safe_cut(
            &member.text[content_start..member.text.len() - 1],
            target,
            true,
        );
        member.text.truncate(content_start + cut);
        member.text.push(b'"');
        *total -= content_len - cut;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> String {
        let mut out = Vec::new();
        encode_json(&Detection::from_json_text(text).unwrap(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn single_line_raw_is_written_unchanged() {
        let raw = r#"{ "B":1, "A":"x y", "N":12345678901234567890123 }"#;
        assert_eq!(json(raw), raw);
    }

    #[test]
    fn pretty_input_is_compacted_to_one_line() {
        let raw = "{\r\n  \"A\": \"a b\\n\",\n  \"N\": 12345678901234567890123,\n  \"O\": { \"k\": [1, 2] }\n}";
        assert_eq!(
            json(raw),
            r#"{"A":"a b\n","N":12345678901234567890123,"O":{"k":[1,2]}}"#
        );
    }

    #[test]
    fn compacting_keeps_escaped_quotes_and_spaces_in_strings() {
        let raw = "{\n \"A\": \"say \\\"hi\\\" \\\\\",\n \"B\": \" \"\n}";
        assert_eq!(json(raw), r#"{"A":"say \"hi\" \\","B":" "}"#);
    }

    #[test]
    fn shortened_json_keeps_protected_fields() {
        let d = Detection::from_json_text(
            r#"{"FullId":"f","AlertId":"a","Big":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","Small":"s","AlertTime":"t","LastProcessedTimeUtc":"l"}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        write_within(&d, &mut out, 0, 83);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"FullId":"f","AlertId":"a","Small":"s","AlertTime":"t","LastProcessedTimeUtc":"l"}"#
        );
    }

    #[test]
    fn shortened_json_truncates_protected_strings_last() {
        let d = Detection::from_json_text(r#"{"FullId":"使使使使\n\u0001","Other":"x"}"#).unwrap();
        for budget in 0..60 {
            let mut out = Vec::new();
            write_within(&d, &mut out, 0, budget);
            assert!(out.len() <= budget, "budget {budget}: {} bytes", out.len());
            if budget < 2 {
                assert!(
                    out.is_empty(),
                    "budget {budget}: {}",
                    String::from_utf8_lossy(&out)
                );
            } else {
                let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&out);
                assert!(
                    parsed.is_ok(),
                    "budget {budget}: {}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
    }
}
