//! JSON payload: the detection's object as the API sent it, on one line.
//!
//! The raw text is written unchanged when it has no line break, which keeps
//! number precision and key order. Pretty-printed input is compacted by
//! removing whitespace outside strings instead of re-serializing the parsed
//! fields, which would respell numbers (`1E400` as `1e+400`) and decode
//! escapes.

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
    /// last to be cut or dropped.
    full_id: bool,
    is_string: bool,
}

/// Appends the detection's JSON so that the message starting at
/// `message_start` is at most `budget` bytes. The JSON stays valid, and is
/// left out when the header leaves no room for `{}`.
///
/// Unprotected members are dropped longest first, then protected members
/// other than `FullId`, also longest first: they are never cut, because a
/// cut ID or time still looks valid. When `FullId` alone is too long, its
/// string value is cut at a boundary that splits no escape or UTF-8
/// sequence, or it is dropped when no part fits. Protected members dropped
/// before are then put back where they fit.
///
/// Returns false when a `FullId` member was cut or dropped, or the JSON
/// left out.
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

    let Some(mut members) = members_of(d) else {
        // `Detection` holds only JSON objects, which the scanner reads, so
        // this branch is not expected to run. `{}` keeps the message valid.
        out.extend_from_slice(b"{}");
        return false;
    };
    let mut plan = Plan::new(&members);
    plan.drop_longest(&members, json_budget, |m| !m.protected);
    let dropped_protected = plan.drop_longest(&members, json_budget, |m| !m.full_id);
    let mut full_id_whole = true;
    if plan.total > json_budget {
        full_id_whole = false;
        plan.cut_full_id(&mut members, json_budget);
        plan.drop_longest(&members, json_budget, |_| true);
    }
    plan.put_back(&members, &dropped_protected, json_budget);

    out.push(b'{');
    let staying = members.iter().zip(&plan.stays).filter(|(_, stays)| **stays);
    for (i, (member, _)) in staying.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&member.text);
    }
    out.push(b'}');
    full_id_whole
}

/// Returns the top-level members of the detection's object, read from its
/// raw text without decoding any string, so a name such as `"\ud800"`,
/// which no Rust string can hold, keeps its member.
fn members_of(d: &Detection) -> Option<Vec<Member>> {
    let raw = d.raw();
    let members = d.raw_members()?;
    let members = members
        .into_iter()
        .map(|(name, value)| {
            let name_text = &raw[name];
            // A name spelled with escapes (`"Full\u0049d"`) is still that name.
            let decoded = crate::detection::decode_json_string(name_text.as_bytes());
            let key = decoded.as_deref().unwrap_or("");
            let value_text = compact_json(&raw[value]);
            let mut text = Vec::with_capacity(name_text.len() + 1 + value_text.len());
            text.extend_from_slice(name_text.as_bytes());
            text.push(b':');
            let value_start = text.len();
            text.extend_from_slice(value_text.as_bytes());
            Member {
                protected: PROTECTED_FIELDS.contains(&key),
                full_id: key == "FullId",
                is_string: value_text.starts_with('"'),
                text,
                value_start,
            }
        })
        .collect();
    Some(members)
}

/// The members that stay, with the length of `{` those members joined by
/// `,` `}`.
struct Plan {
    stays: Vec<bool>,
    total: usize,
    remaining: usize,
}

impl Plan {
    fn new(members: &[Member]) -> Self {
        let total = 2 + members.iter().map(|m| m.text.len()).sum::<usize>() + members.len().saturating_sub(1);
        Self { stays: vec![true; members.len()], total, remaining: members.len() }
    }

    /// Drops members for which `may_drop` is true, longest first, until the
    /// object fits `budget`. Returns the dropped members' indexes.
    fn drop_longest(&mut self, members: &[Member], budget: usize, may_drop: fn(&Member) -> bool) -> Vec<usize> {
        let mut dropped = Vec::new();
        while self.total > budget {
            let longest = (0..members.len())
                .filter(|&i| self.stays[i] && may_drop(&members[i]))
                .max_by_key(|&i| members[i].text.len());
            let Some(i) = longest else { break };
            self.stays[i] = false;
            self.remaining -= 1;
            // Each member but the only one left brings one comma with it.
            self.total -= members[i].text.len() + usize::from(self.remaining > 0);
            dropped.push(i);
        }
        dropped
    }

    /// Cuts the string value of each kept `FullId` member, so the object
    /// fits `budget` where part of the value does.
    fn cut_full_id(&mut self, members: &mut [Member], budget: usize) {
        for (i, member) in members.iter_mut().enumerate() {
            if self.total <= budget || !self.stays[i] || !member.full_id || !member.is_string {
                continue;
            }
            // The string's content lies between the quotes at both ends.
            let content_start = member.value_start + 1;
            let content_len = member.text.len() - 1 - content_start;
            let excess = self.total - budget;
            let cut = safe_cut(&member.text[content_start..member.text.len() - 1], content_len.saturating_sub(excess), true);
            if cut == 0 {
                // An empty FullId matches no detection: `drop_longest` drops it.
                continue;
            }
            member.text.truncate(content_start + cut);
            member.text.push(b'"');
            self.total -= content_len - cut;
        }
    }

    /// Puts back the members of `dropped` that fit `budget` again.
    fn put_back(&mut self, members: &[Member], dropped: &[usize], budget: usize) {
        for &i in dropped.iter().rev() {
            let added = members[i].text.len() + usize::from(self.remaining > 0);
            if self.total + added <= budget {
                self.stays[i] = true;
                self.total += added;
                self.remaining += 1;
            }
        }
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

    /// A name no Rust string can hold (a lone surrogate) keeps its member
    /// and every other one: the object is read without decoding.
    #[test]
    fn shortened_json_reads_surrogate_names() {
        let raw = format!(r#"{{"AlertId":"s1","FullId":"S-fid","\ud800k":"v","Description":"{}"}}"#, "p".repeat(2000));
        let d = Detection::from_json_text(&raw).unwrap();
        let mut out = Vec::new();
        let whole = write_within(&d, &mut out, 0, 480);
        assert!(whole);
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"AlertId":"s1","FullId":"S-fid","\ud800k":"v"}"#);
    }

    /// The other protected members go before the FullId is cut, so a FullId
    /// that fits alone arrives whole.
    #[test]
    fn shortened_json_drops_others_before_full_id() {
        let full_id = "J".repeat(450);
        let raw = format!(r#"{{"AlertId":"a1","AlertTime":"2026-12-05T00:00:00Z","LastProcessedTimeUtc":"2026-12-05T00:00:01Z","FullId":"{full_id}"}}"#);
        let d = Detection::from_json_text(&raw).unwrap();
        let mut out = Vec::new();
        let whole = write_within(&d, &mut out, 0, 480);
        assert!(whole);
        // The two times, longest first, make room; the short AlertId stays.
        assert_eq!(String::from_utf8(out).unwrap(), format!(r#"{{"AlertId":"a1","FullId":"{full_id}"}}"#));
    }

    /// A protected value other than the FullId is whole or absent at every
    /// limit, and the FullId is cut only when it alone does not fit.
    #[test]
    fn shortened_json_never_cuts_other_protected() {
        let raw = r#"{"AlertId":"da637370718981685665_16349121","FullId":"da637370718981685665_16349121:R4xEdgAvDb2LQl3BgHoA3NYqKmRSiIAG7dpxAJCYZhY=","AlertTime":"2020-09-30T14:09:20.9999999Z","LastProcessedTimeUtc":"2020-09-30T14:11:44.0779765Z","Title":"t"}"#;
        let original: serde_json::Value = serde_json::from_str(raw).unwrap();
        let d = Detection::from_json_text(raw).unwrap();
        let full_id_alone = r#"{"FullId":""}"#.len() + original["FullId"].as_str().unwrap().len();
        for budget in 2..raw.len() {
            let mut out = Vec::new();
            let whole = write_within(&d, &mut out, 0, budget);
            let text = String::from_utf8(out).unwrap();
            assert!(text.len() <= budget, "budget {budget}: {text}");
            let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
            for key in ["AlertId", "AlertTime", "LastProcessedTimeUtc"] {
                assert!(parsed.get(key).is_none_or(|value| *value == original[key]), "budget {budget}: {text}");
            }
            assert_eq!(whole, budget >= full_id_alone, "budget {budget}: {text}");
            assert_eq!(whole, parsed.get("FullId") == Some(&original["FullId"]), "budget {budget}: {text}");
        }
    }

    /// A FullId cut to fit never ends between the two escapes of one
    /// character (`\ud83d\ude00`), which would leave invalid JSON.
    #[test]
    fn shortened_json_keeps_surrogate_pairs() {
        let raw = format!(r#"{{"FullId":"{}"}}"#, r"\ud83d\ude00".repeat(20));
        let d = Detection::from_json_text(&raw).unwrap();
        for budget in 2..raw.len() {
            let mut out = Vec::new();
            write_within(&d, &mut out, 0, budget);
            let text = String::from_utf8(out).unwrap();
            assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok(), "budget {budget}: {text}");
        }
    }
}
