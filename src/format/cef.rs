//! ArcSight Common Event Format (CEF) encoding of a detection.
//!
//! The extension keys follow the ArcSight column of Microsoft's field mapping
//! for this API, extended so that no field of a detection is lost: fields
//! without a mapped key are written under their own names. The table below
//! is the only place the mapping lives.

use std::net::IpAddr;
use std::sync::LazyLock;

use hashbrown::HashSet;

use serde::Deserialize;
use super::extension::{self, Entry, ExtensionWriter, ValueEscape};
use super::known::{Field, KnownFields};
use crate::detection::{Detection, FieldValue};
use crate::timefmt;

/// Separator between extension pairs.
pub(super) const SEPARATOR: u8 = b' ';

/// The vendor, product and version written in the CEF header.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CefOptions {
    pub vendor: String,
    pub product: String,
    pub version: String,
}

impl Default for CefOptions {
    /// Returns the values ArcSight's parser for this API expects.
    fn default() -> Self {
        Self {
            vendor: "Microsoft".to_owned(),
            product: "Microsoft Defender ATP".to_owned(),
            version: "2.0".to_owned(),
        }
    }
}

/// Conversion of a field's value into the value of its key.
#[derive(Clone, Copy, Debug)]
enum Conversion {
    /// The field's text, escaped.
    Text,
    /// `1` or `0` from a boolean or the strings `true`/`false`.
    Flag,
    /// The text, only when it parses as an IPv4 or IPv6 address.
    Address,
    /// Milliseconds since the Unix epoch from an API timestamp.
    EpochMillis,
    /// A 64-bit integer, from a JSON integer or a string of digits.
    Integer,
}

/// One row of the mapping: a detection field and the CEF key it lands in.
struct Mapping {
    field: Field,
    key: &'static str,
    /// Key of the label pair (`cs1Label`) whose value is the field name.
    label: Option<&'static str>,
    conversion: Conversion,
    /// Identifying fields, the last to go when a message is shortened.
    keep: bool,
}

const fn row(field: Field, key: &'static str) -> Mapping {
    Mapping {
        field,
        key,
        label: None,
        conversion: Conversion::Text,
        keep: false,
    }
}

const fn labeled(field: Field, key: &'static str, label: &'static str) -> Mapping {
    Mapping {
        field,
        key,
        label: Some(label),
        conversion: Conversion::Text,
        keep: false,
    }
}

const fn with(mut mapping: Mapping, conversion: Conversion) -> Mapping {
    mapping.conversion = conversion;
    mapping
}

const fn identifying(mut mapping: Mapping) -> Mapping {
    mapping.keep = true;
    mapping
}

/// The extension in the order it is written.
const MAPPINGS: &[Mapping] = &[
    identifying(row(Field::Category, "cat")),
    row(Field::Source, "sourceServiceName"),
    identifying(row(Field::MachineName, "shost")),
    row(Field::FileName, "fname"),
    row(Field::FilePath, "filePath"),
    row(Field::UserDomain, "sntdom"),
    row(Field::UserName, "suser"),
    row(Field::Sha1, "fileHash"),
    labeled(Field::Sha256, "cs6", "cs6Label"),
    labeled(Field::Md5, "cs5", "cs5Label"),
    labeled(Field::ThreatName, "cs1", "cs1Label"),
    labeled(Field::Actor, "cs4", "cs4Label"),
    with(row(Field::IpAddress, "src"), Conversion::Address),
    row(Field::Url, "request"),
    with(
        labeled(Field::RemediationIsSuccess, "cn2", "cn2Label"),
        Conversion::Flag,
    ),
    with(
        labeled(Field::WasExecutingWhileDetected, "cn1", "cn1Label"),
        Conversion::Flag,
    ),
    identifying(row(Field::AlertId, "externalId")),
    labeled(Field::LinkToWDATP, "flexString1", "flexString1Label"),
    identifying(with(row(Field::AlertTime, "rt"), Conversion::EpochMillis)),
    row(Field::MachineDomain, "sourceDnsDomain"),
    row(Field::LogOnUsers, "suid"),
    labeled(Field::CommandLine, "cs2", "cs2Label"),
    identifying(labeled(Field::FullId, "cs3", "cs3Label")),
    with(labeled(Field::ReportID, "cn3", "cn3Label"), Conversion::Integer),
    labeled(Field::LinkToMTP, "flexString2", "flexString2Label"),
    identifying(with(
        labeled(
            Field::LastProcessedTimeUtc,
            "deviceCustomDate1",
            "deviceCustomDate1Label",
        ),
        Conversion::EpochMillis,
    )),
    identifying(row(Field::ComputerDnsName, "dvchost")),
    row(Field::DeviceID, "deviceExternalId"),
    row(Field::Description, "msg"),
    row(Field::RemediationAction, "act"),
    identifying(row(Field::Severity, "Severity")),
];

/// Keys the mapping writes, labels included. A custom key equal to one of
/// them gets the collision prefix.
fn is_reserved_key(key: &str) -> bool {
    // Asked once per custom field of every event: a set beats a scan of
    // the table.
    static RESERVED: LazyLock<HashSet<&'static str, foldhash::fast::RandomState>> = LazyLock::new(|| {
        let mut keys = HashSet::with_hasher(foldhash::fast::RandomState::default());
        for mapping in MAPPINGS {
            keys.insert(mapping.key);
            keys.extend(mapping.label);
        }
        keys
    });
    RESERVED.contains(key)
}

/// Appends a CEF event for `d`, without syslog header or line break.
///
/// Returns the number of custom keys dropped because their names are not
/// plain ASCII letters and digits.
pub fn encode_cef(d: &Detection, options: &CefOptions, out: &mut Vec<u8>) -> u32 {
    let prefix = header_prefix(options);
    let known = KnownFields::read(d);
    write_header(&prefix, &known, super::HeaderLimit::NONE, out);
    write_extension(&known, out, None)
}

/// Returns `CEF:0|Vendor|Product|Version|` with header escapes applied.
pub(super) fn header_prefix(options: &CefOptions) -> Vec<u8> {
    let mut prefix = b"CEF:0|".to_vec();
    for field in [&options.vendor, &options.product, &options.version] {
        extension::escape_header(field, false, &mut prefix);
        prefix.push(b'|');
    }
    prefix
}

/// Appends the header from `prefix` on: Device Event Class ID, Name and
/// numeric Severity, each followed by `|`. The class ID and Name are cut to
/// the byte counts in `limit`.
pub(super) fn write_header(prefix: &[u8], known: &KnownFields<'_>, limit: super::HeaderLimit, out: &mut Vec<u8>) {
    out.extend_from_slice(prefix);
    let class_id = known
        .text(Field::IoaDefinitionId)
        .or_else(|| known.text(Field::ThreatName))
        .or_else(|| known.text(Field::Category));
    write_header_field(class_id.as_deref().unwrap_or(""), limit.class_id, out);
    out.push(b'|');
    write_header_field(known.text(Field::AlertTitle).as_deref().unwrap_or(""), limit.name, out);
    out.push(b'|');
    extension::write_integer(i64::from(numeric_severity(known)), out);
    out.push(b'|');
}

/// Appends an escaped header field, cut to at most `cap` bytes at a
/// boundary that splits no escape or UTF-8 sequence.
pub(super) fn write_header_field(text: &str, cap: usize, out: &mut Vec<u8>) {
    let start = out.len();
    extension::escape_header(text, false, out);
    if out.len() - start > cap {
        let cut = extension::safe_cut(&out[start..], cap, false);
        out.truncate(start + cut);
    }
}

/// Returns the 0–10 severity of the CEF header (the same numbers serve as
/// LEEF `sev`): Informational 1, Low 3, Medium 5, High 8, anything else 5.
/// Case and surrounding spaces of the text are ignored.
pub(super) fn numeric_severity(known: &KnownFields<'_>) -> u8 {
    let text = known.text(Field::Severity);
    let text = text.as_deref().map(str::trim).unwrap_or("");
    if text.eq_ignore_ascii_case("informational") {
        1
    } else if text.eq_ignore_ascii_case("low") {
        3
    } else if text.eq_ignore_ascii_case("high") {
        8
    } else {
        5
    }
}

/// Appends the extension: mapped keys in table order, then every other
/// non-empty field under its own name. When `entries` is given, each pair's
/// range is recorded for shortening.
pub(super) fn write_extension(
    known: &KnownFields<'_>,
    out: &mut Vec<u8>,
    entries: Option<&mut Vec<Entry>>,
) -> u32 {
    let mut writer = ExtensionWriter::new(out, SEPARATOR, ValueEscape::Cef, entries);

    for mapping in MAPPINGS {
        if mapping.field == Field::FullId {
            writer.primary(|writer| write_mapped(writer, known, mapping));
        } else {
            write_mapped(&mut writer, known, mapping);
        }
    }

    // The header turns line breaks into spaces, so a header field that has
    // one is also written whole under its own name.
    let d = known.detection();
    for field in [Field::IoaDefinitionId, Field::AlertTitle] {
        if let Some(text) = known.text(field).filter(|text| extension::has_line_break(text)) {
            writer.custom(d, field.name(), &text, is_reserved_key, false);
        }
    }

    // The known fields are those of the header and the mapping, so none of
    // them is a custom key.
    for (field, entry) in known.classified() {
        if field.is_some() {
            continue;
        }
        if let Some(text) = entry.value().text() {
            writer.custom(d, entry.name(), &text, is_reserved_key, false);
        }
    }
    writer.dropped_keys
}

fn write_mapped(writer: &mut ExtensionWriter<'_>, known: &KnownFields<'_>, mapping: &Mapping) {
    let Some(value) = known.get(mapping.field) else {
        return;
    };
    let Some(text) = value.text() else {
        return;
    };
    let field = mapping.field.name();
    let label = mapping.label.map(|label| (label, field));

    let converted = match mapping.conversion {
        Conversion::Text => {
            writer.text(mapping.key, &text, label, mapping.keep);
            return;
        }
        Conversion::Address => {
            if text.parse::<IpAddr>().is_ok() {
                writer.whole_text(mapping.key, &text, label, mapping.keep);
                return;
            }
            None
        }
        Conversion::Flag => flag(value),
        Conversion::EpochMillis => timefmt::parse(&text).map(|t| t.timestamp_millis()),
        Conversion::Integer => integer(value),
    };

    match converted {
        Some(number) => writer.number(mapping.key, number, label, mapping.keep),
        // A value the key cannot hold goes under the field's own name, so
        // it is still delivered.
        None => writer.custom(known.detection(), field, &text, is_reserved_key, mapping.keep),
    }
}

fn flag(value: FieldValue<'_>) -> Option<i64> {
    match value {
        FieldValue::Bool(b) => Some(i64::from(b)),
        FieldValue::String(s) if s.eq_ignore_ascii_case("true") => Some(1),
        FieldValue::String(s) if s.eq_ignore_ascii_case("false") => Some(0),
        _ => None,
    }
}

/// Returns a JSON integer, or a string of digits, that fits in an i64. A
/// number with a fraction or exponent is not an integer here, as in `serde_json`.
fn integer(value: FieldValue<'_>) -> Option<i64> {
    match value {
        FieldValue::Number(n) | FieldValue::String(n) => n.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn detection(json: &str) -> Detection {
        Detection::from_json_text(json).unwrap()
    }

    fn cef(json: &str) -> String {
        let mut out = Vec::new();
        encode_cef(&detection(json), &CefOptions::default(), &mut out);
        String::from_utf8(out).unwrap()
    }

    /// Splits a CEF line into its seven header fields (still escaped) and the
    /// extension, honoring `\|` and `\\`.
    fn split_cef(line: &str) -> (Vec<&str>, &str) {
        let bytes = line.as_bytes();
        let mut fields = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < bytes.len() && fields.len() < 7 {
            match bytes[i] {
                b'\\' => i += 1,
                b'|' => {
                    fields.push(&line[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        assert_eq!(fields.len(), 7, "not seven header fields: {line}");
        (fields, &line[start..])
    }

    /// Splits an extension into (key, escaped value) pairs. A pair starts at
    /// a space followed by letters and digits and an unescaped `=`.
    fn pairs(extension: &str) -> Vec<(String, String)> {
        let mut result: Vec<(String, String)> = Vec::new();
        for word in extension.split(' ') {
            let key_end = word
                .find('=')
                .filter(|&end| end > 0 && word[..end].bytes().all(|b| b.is_ascii_alphanumeric()));
            match (key_end, result.last_mut()) {
                (Some(end), _) => result.push((word[..end].to_owned(), word[end + 1..].to_owned())),
                (None, Some(last)) => {
                    last.1.push(' ');
                    last.1.push_str(word);
                }
                (None, None) => panic!("extension starts without a key: {extension}"),
            }
        }
        result
    }

    fn extension_pairs(json: &str) -> Vec<(String, String)> {
        let line = cef(json);
        let (_, extension) = split_cef(&line);
        if extension.is_empty() {
            Vec::new()
        } else {
            pairs(extension)
        }
    }

    fn value_of(pairs: &[(String, String)], key: &str) -> Option<String> {
        pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    /// `write_extension` skips every known field as a custom key, which is
    /// right only while the known fields are exactly those of the header and
    /// the mapping.
    #[test]
    fn known_fields_are_header_and_mapping() {
        let mut fields = vec![Field::AlertTitle, Field::IoaDefinitionId];
        fields.extend(MAPPINGS.iter().map(|mapping| mapping.field));
        assert_eq!(fields, Field::ALL);
    }

    #[test]
    fn documented_sample_encodes_to_expected_line() {
        let text = std::fs::read_to_string("tests/data/documented-response.json").unwrap();
        let items: Vec<Box<RawValue>> = serde_json::from_str(&text).unwrap();
        let d = Detection::from_raw(&items[0]).unwrap();
        let mut out = Vec::new();
        let dropped = encode_cef(&d, &CefOptions::default(), &mut out);
        let expected = concat!(
            "CEF:0|Microsoft|Microsoft Defender ATP|2.0|b20af1d2-5990-4672-87f1-acc2a8ff7725|",
            "Suspicious File Activity|8|",
            "cat=Malware sourceServiceName=EDR shost=mymachine1 fname=cmdParent.exe ",
            r"filePath=C:\\WINDOWS\\SysWOW64\\boo3\\qwerty ",
            "fileHash=aabbccddee1122334455aabbccddee1122334455 ",
            "cs5=854b85cbff2752fcb88606bca76f83c6 cs5Label=Md5 ",
            "externalId=da637370718981685665_16349121 ",
            "flexString1=https://securitycenter.windows.com/alert/da637370718981685665_16349121 ",
            "flexString1Label=LinkToWDATP ",
            "rt=1601474960357 sourceDnsDomain=domain.com ",
            r"cs3=da637370718981685665_16349121:R4xEdgAvDb2LQl3BgHoA3NYqKmRSiIAG7dpxAJCYZhY\= cs3Label=FullId ",
            "cn3=1053729833 cn3Label=ReportID ",
            "flexString2=https://security.microsoft.com/alert/da637370718981685665_16349121 ",
            "flexString2Label=LinkToMTP ",
            "deviceCustomDate1=1601475104077 deviceCustomDate1Label=LastProcessedTimeUtc ",
            "dvchost=mymachine1.domain.com deviceExternalId=deadbeef000040830ee54503926f556dcaf82bb0 ",
            "msg=Test Alert Severity=High ",
            "AlertPart=0 FileHash=aabbccddee1122334455aabbccddee1122334455 ",
            r"IncidentLinkToWDATP=https://securitycenter.windows.com/incidents/byalert?alertId\=da637370718981685665_16349121&source\=SIEM ",
            r"IncidentLinkToMTP=https://security.microsoft.com/incidents/byalert?alertId\=da637370718981685665_16349121&source\=SIEM ",
            "ExternalId=31DD0A845DDA4059FDEDE031014645350AECABD3 ",
            r"IocUniqueId=R4xEdgAvDb2LQl3BgHoA3NYqKmRSiIAG7dpxAJCYZhY\=",
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(dropped, 0);
    }

    #[test]
    fn header_fields_escape_pipe_backslash_and_breaks() {
        let cases = [
            ("a|b", r"a\|b"),
            (r"a\b", r"a\\b"),
            (r"a\|b", r"a\\\|b"),
            ("a\rb", "a b"),
            ("a\nb", "a b"),
            ("a\r\nb", "a b"),
            ("a\n\r\nb", "a  b"),
            ("a=b", "a=b"),
            (r"C:\Users\使用者\文件", r"C:\\Users\\使用者\\文件"),
        ];
        for (title, expected) in cases {
            let json =
                serde_json::json!({ "AlertTitle": title, "IoaDefinitionId": title }).to_string();
            let line = cef(&json);
            let (header, _) = split_cef(&line);
            assert_eq!(header[4], expected, "class id of {title:?}");
            assert_eq!(header[5], expected, "name of {title:?}");
        }
    }

    /// A line break the header turns into a space would change the value,
    /// so the field is also written whole in the extension.
    #[test]
    fn header_fields_with_breaks_are_kept_whole() {
        let json = serde_json::json!({ "AlertTitle": "one\r\ntwo", "IoaDefinitionId": "ioa\nX" }).to_string();
        let line = cef(&json);
        let (_, extension) = split_cef(&line);
        assert!(extension.contains(r"IoaDefinitionId=ioa\nX"), "{extension}");
        assert!(extension.contains(r"AlertTitle=one\r\ntwo"), "{extension}");

        let plain = serde_json::json!({ "AlertTitle": "one two", "IoaDefinitionId": "ioa X" }).to_string();
        let line = cef(&plain);
        let (_, extension) = split_cef(&line);
        assert!(!extension.contains("AlertTitle="), "only the header has it: {extension}");
        assert!(!extension.contains("IoaDefinitionId="), "{extension}");
    }

    #[test]
    fn header_options_are_escaped() {
        let options = CefOptions {
            vendor: "A|B".into(),
            product: "C\\D".into(),
            version: "1\n2".into(),
        };
        let mut out = Vec::new();
        encode_cef(&detection("{}"), &options, &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), r"CEF:0|A\|B|C\\D|1 2|||5|");
    }

    #[test]
    fn extension_values_escape_per_cef() {
        let cases = [
            ("a=b", r"a\=b"),
            (r"a\b", r"a\\b"),
            ("a|b", "a|b"),
            ("a\rb", r"a\rb"),
            ("a\nb", r"a\nb"),
            ("a\r\nb", r"a\r\nb"),
            (r"\=", r"\\\="),
            ("trailing\\", r"trailing\\"),
            (r"C:\Users\使用者\文件", r"C:\\Users\\使用者\\文件"),
            ("  spaced  out ", "  spaced  out "),
        ];
        for (input, expected) in cases {
            let json = serde_json::json!({ "Description": input, "Custom": input }).to_string();
            let line = cef(&json);
            assert!(!line.contains(['\r', '\n']), "line break in {line:?}");
            let pairs = pairs(split_cef(&line).1);
            assert_eq!(
                value_of(&pairs, "msg").as_deref(),
                Some(expected),
                "msg of {input:?}"
            );
            assert_eq!(
                value_of(&pairs, "Custom").as_deref(),
                Some(expected),
                "custom of {input:?}"
            );
        }
    }

    #[test]
    fn class_id_fallback_order() {
        let cases = [
            (
                r#"{"IoaDefinitionId":"ioa","ThreatName":"t","Category":"c"}"#,
                "ioa",
            ),
            (
                r#"{"IoaDefinitionId":"","ThreatName":"t","Category":"c"}"#,
                "t",
            ),
            (
                r#"{"IoaDefinitionId":null,"ThreatName":"","Category":"c"}"#,
                "c",
            ),
            (r#"{"Category":""}"#, ""),
        ];
        for (json, expected) in cases {
            let line = cef(json);
            assert_eq!(split_cef(&line).0[4], expected, "{json}");
        }
    }

    #[test]
    fn header_severity_follows_table() {
        let cases = [
            (r#"{"Severity":"Informational"}"#, "1"),
            (r#"{"Severity":"Low"}"#, "3"),
            (r#"{"Severity":"Medium"}"#, "5"),
            (r#"{"Severity":"High"}"#, "8"),
            (r#"{"Severity":"high"}"#, "8"),
            (r#"{"Severity":"Critical"}"#, "5"),
            (r#"{"Severity":7}"#, "5"),
            (r#"{}"#, "5"),
        ];
        for (json, expected) in cases {
            let line = cef(json);
            assert_eq!(split_cef(&line).0[6], expected, "{json}");
        }
    }

    #[test]
    fn severity_text_is_kept_in_extension() {
        let pairs = extension_pairs(r#"{"Severity":"Critical"}"#);
        assert_eq!(value_of(&pairs, "Severity").as_deref(), Some("Critical"));
    }

    #[test]
    fn empty_and_null_values_write_no_key() {
        let line = cef(r#"{"Category":"","ThreatName":null,"Sha256":"","Custom":"","Other":null}"#);
        assert_eq!(line, "CEF:0|Microsoft|Microsoft Defender ATP|2.0|||5|");
    }

    #[test]
    fn labels_appear_only_with_values() {
        let pairs = extension_pairs(r#"{"ThreatName":"Emotet","Actor":"","CommandLine":null}"#);
        assert_eq!(value_of(&pairs, "cs1").as_deref(), Some("Emotet"));
        assert_eq!(value_of(&pairs, "cs1Label").as_deref(), Some("ThreatName"));
        assert_eq!(value_of(&pairs, "cs4Label"), None);
        assert_eq!(value_of(&pairs, "cs2Label"), None);
    }

    #[test]
    fn numbers_where_strings_are_usual_are_written() {
        let pairs = extension_pairs(r#"{"Category":5,"MachineName":12.5,"AlertId":-3}"#);
        assert_eq!(value_of(&pairs, "cat").as_deref(), Some("5"));
        assert_eq!(value_of(&pairs, "shost").as_deref(), Some("12.5"));
        assert_eq!(value_of(&pairs, "externalId").as_deref(), Some("-3"));
    }

    #[test]
    fn nested_values_are_compact_json() {
        let pairs = extension_pairs(r#"{"Evidence":{ "k" : [1, "a=b"] },"List":[]}"#);
        assert_eq!(
            value_of(&pairs, "Evidence").as_deref(),
            Some(r#"{"k":[1,"a\=b"]}"#)
        );
        assert_eq!(value_of(&pairs, "List").as_deref(), Some("[]"));
        // Numbers, escapes and repeated keys inside stay as the API sent them.
        let pairs = extension_pairs(r#"{"Evidence":{"n":[1E400, 1.50e3],"s":"\u00e9","n":-0}}"#);
        assert_eq!(
            value_of(&pairs, "Evidence").as_deref(),
            Some(r#"{"n":[1E400,1.50e3],"s":"\\u00e9","n":-0}"#)
        );
    }

    #[test]
    fn unknown_fields_keep_their_names_in_order() {
        let pairs = extension_pairs(r#"{"Zeta":"z","Alpha":"a","Category":"c"}"#);
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, vec!["cat", "Zeta", "Alpha"]);
    }

    #[test]
    fn non_plain_field_names_are_dropped_and_counted() {
        let mut out = Vec::new();
        let d = detection(
            r#"{"a b":"1","a=b":"2","a_b":"3","名前":"4","":"5","ok":"6","bad name":null}"#,
        );
        let dropped = encode_cef(&d, &CefOptions::default(), &mut out);
        assert_eq!(dropped, 5);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "CEF:0|Microsoft|Microsoft Defender ATP|2.0|||5|ok=6"
        );
    }

    #[test]
    fn colliding_custom_keys_get_prefix() {
        let pairs = extension_pairs(
            r#"{"Description":"real","msg":"fake","cat":"c","cs1Label":"l","Severity":"Low","mdemsg":"m"}"#,
        );
        let keys: Vec<&str> = pairs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            vec![
                "msg",
                "Severity",
                "mdemdemsg",
                "mdecat",
                "mdecs1Label",
                "mdemsg"
            ]
        );
        assert_eq!(value_of(&pairs, "msg").as_deref(), Some("real"));
        assert_eq!(value_of(&pairs, "mdemdemsg").as_deref(), Some("fake"));
        assert_eq!(value_of(&pairs, "mdemsg").as_deref(), Some("m"));
    }

    #[test]
    fn collision_applies_even_when_mapped_field_is_empty() {
        let pairs = extension_pairs(r#"{"Description":"","msg":"fake"}"#);
        assert_eq!(value_of(&pairs, "msg"), None);
        assert_eq!(value_of(&pairs, "mdemsg").as_deref(), Some("fake"));
    }

    #[test]
    fn flags_become_one_or_zero() {
        let cases = [
            ("true", Some("1"), None),
            ("false", Some("0"), None),
            (r#""true""#, Some("1"), None),
            (r#""False""#, Some("0"), None),
            ("null", None, None),
            (r#""""#, None, None),
            (r#""yes""#, None, Some("yes")),
            ("1", None, Some("1")),
        ];
        for (value, flag, own) in cases {
            let json = format!(
                r#"{{"RemediationIsSuccess":{value},"WasExecutingWhileDetected":{value}}}"#
            );
            let pairs = extension_pairs(&json);
            assert_eq!(value_of(&pairs, "cn2").as_deref(), flag, "cn2 of {value}");
            assert_eq!(value_of(&pairs, "cn1").as_deref(), flag, "cn1 of {value}");
            let label = flag.map(|_| "RemediationIsSuccess");
            assert_eq!(
                value_of(&pairs, "cn2Label").as_deref(),
                label,
                "cn2Label of {value}"
            );
            assert_eq!(
                value_of(&pairs, "RemediationIsSuccess").as_deref(),
                own,
                "own name of {value}"
            );
        }
    }

    #[test]
    fn src_requires_valid_address() {
        let cases = [
            ("203.0.113.7", Some("203.0.113.7"), None),
            ("fe80::1", Some("fe80::1"), None),
            ("203.0.113.300", None, Some("203.0.113.300")),
            ("10.0.0.1,10.0.0.2", None, Some("10.0.0.1,10.0.0.2")),
            ("host=evil", None, Some(r"host\=evil")),
        ];
        for (address, src, own) in cases {
            let pairs = extension_pairs(&serde_json::json!({ "IpAddress": address }).to_string());
            assert_eq!(value_of(&pairs, "src").as_deref(), src, "src of {address}");
            assert_eq!(
                value_of(&pairs, "IpAddress").as_deref(),
                own,
                "own name of {address}"
            );
        }
    }

    #[test]
    fn times_become_epoch_milliseconds() {
        let pairs = extension_pairs(
            r#"{"AlertTime":"2020-09-30T14:11:44.0779765Z","LastProcessedTimeUtc":"2020-09-30T14:11:44.9999999Z"}"#,
        );
        assert_eq!(value_of(&pairs, "rt").as_deref(), Some("1601475104077"));
        assert_eq!(
            value_of(&pairs, "deviceCustomDate1").as_deref(),
            Some("1601475104999")
        );
        assert_eq!(
            value_of(&pairs, "deviceCustomDate1Label").as_deref(),
            Some("LastProcessedTimeUtc")
        );
    }

    #[test]
    fn unparsable_times_keep_own_names() {
        let pairs = extension_pairs(r#"{"AlertTime":"yesterday","LastProcessedTimeUtc":"later"}"#);
        assert_eq!(value_of(&pairs, "rt"), None);
        assert_eq!(value_of(&pairs, "AlertTime").as_deref(), Some("yesterday"));
        assert_eq!(
            value_of(&pairs, "LastProcessedTimeUtc").as_deref(),
            Some("later")
        );
        assert_eq!(value_of(&pairs, "deviceCustomDate1Label"), None);
    }

    #[test]
    fn report_id_needs_integer() {
        let cases = [
            ("1053729833", Some("1053729833"), None),
            (r#""42""#, Some("42"), None),
            ("-7", Some("-7"), None),
            ("1.5", None, Some("1.5")),
            (r#""abc""#, None, Some("abc")),
            ("true", None, Some("true")),
        ];
        for (value, cn3, own) in cases {
            let pairs = extension_pairs(&format!(r#"{{"ReportID":{value}}}"#));
            assert_eq!(value_of(&pairs, "cn3").as_deref(), cn3, "cn3 of {value}");
            assert_eq!(
                value_of(&pairs, "ReportID").as_deref(),
                own,
                "own name of {value}"
            );
        }
    }

    #[test]
    fn every_sample_detection_is_one_line() {
        let text = std::fs::read_to_string("tests/data/detections.json").unwrap();
        let items: Vec<Box<RawValue>> = serde_json::from_str(&text).unwrap();
        assert!(!items.is_empty());
        for item in &items {
            let d = Detection::from_raw(item).unwrap();
            let mut out = Vec::new();
            encode_cef(&d, &CefOptions::default(), &mut out);
            let line = String::from_utf8(out).unwrap();
            assert!(!line.contains(['\r', '\n']), "line break in {line}");
            assert!(line.starts_with("CEF:0|"), "{line}");
        }
    }

    #[test]
    fn sample_multiline_description_is_escaped() {
        let d = detection(r#"{"Description":"line one.\n\nline two."}"#);
        let mut out = Vec::new();
        encode_cef(&d, &CefOptions::default(), &mut out);
        assert!(String::from_utf8(out)
            .unwrap()
            .ends_with(r"msg=line one.\n\nline two."));
    }
}
