//! QRadar Log Event Extended Format (LEEF) 2.0 encoding of a detection.
//!
//! The header declares a tab as the attribute delimiter (`x09`). Fields that
//! match a predefined LEEF attribute use its key, so QRadar normalizes them.
//! Every other non-empty field is written under its own name, as in CEF.

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::Deserialize;

use super::cef::numeric_severity;
use super::extension::{self, Entry, ExtensionWriter, ValueEscape};
use super::known::{Field, KnownFields};
use crate::detection::Detection;
use crate::timefmt;

/// Separator between attributes, declared as `x09` in the header.
pub(super) const SEPARATOR: u8 = b'\t';

/// Java `SimpleDateFormat` pattern of `devTime`, one of the patterns IBM's
/// LEEF guide suggests.
const DEV_TIME_FORMAT: &str = "MMM dd yyyy HH:mm:ss.SSS z";

/// IBM's LEEF guide limits the header's EventID to 255 characters.
const MAX_EVENT_ID_CHARS: usize = 255;

/// The vendor, product and version written in the LEEF header.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeefOptions {
    pub vendor: String,
    pub product: String,
    pub version: String,
}

impl Default for LeefOptions {
    fn default() -> Self {
        Self {
            vendor: "Microsoft".to_owned(),
            product: "Microsoft Defender ATP".to_owned(),
            version: "2.0".to_owned(),
        }
    }
}

/// Detection fields written under a predefined LEEF key, or under their own
/// name in a fixed place.
fn is_mapped_field(field: Field) -> bool {
    matches!(
        field,
        Field::IoaDefinitionId
            | Field::Category
            | Field::Severity
            | Field::AlertTime
            | Field::IpAddress
            | Field::UserName
            | Field::UserDomain
            | Field::ComputerDnsName
            | Field::MachineName
            | Field::Url
    )
}

/// Keys the mapping writes. A custom key equal to one of them gets the
/// collision prefix.
fn is_reserved_key(key: &str) -> bool {
    matches!(
        key,
        "cat"
            | "sev"
            | "devTime"
            | "devTimeFormat"
            | "src"
            | "usrName"
            | "domain"
            | "identHostName"
            | "resource"
            | "url"
            | "Severity"
    )
}

/// Unmapped fields that identify a detection, the last to go when a message
/// is shortened.
fn is_identifying_field(field: Field) -> bool {
    matches!(field, Field::AlertId | Field::FullId | Field::LastProcessedTimeUtc)
}

/// Appends a LEEF 2.0 event for `d`, without syslog header or line break.
///
/// Returns the number of custom keys dropped because their names are not
/// plain ASCII letters and digits.
pub fn encode_leef(d: &Detection, options: &LeefOptions, out: &mut Vec<u8>) -> u32 {
    let prefix = header_prefix(options);
    let known = KnownFields::read(d);
    write_header(&prefix, &known, super::HeaderLimit::NONE, out);
    write_attributes(&known, out, None)
}

/// Returns `LEEF:2.0|Vendor|Product|Version|` with header escapes applied.
pub(super) fn header_prefix(options: &LeefOptions) -> Vec<u8> {
    let mut prefix = b"LEEF:2.0|".to_vec();
    for field in [&options.vendor, &options.product, &options.version] {
        extension::escape_header(field, true, &mut prefix);
        prefix.push(b'|');
    }
    prefix
}

/// Appends the header from `prefix` on: the EventID (`IoaDefinitionId`, else
/// `ThreatName`, else `Category`, at most 255 characters, and at most
/// `limit.class_id` bytes) and the delimiter field `x09`.
pub(super) fn write_header(prefix: &[u8], known: &KnownFields<'_>, limit: super::HeaderLimit, out: &mut Vec<u8>) {
    out.extend_from_slice(prefix);
    let event_id = known
        .text(Field::IoaDefinitionId)
        .or_else(|| known.text(Field::ThreatName))
        .or_else(|| known.text(Field::Category));
    let event_id = event_id.as_deref().unwrap_or("");
    let end = event_id
        .char_indices()
        .nth(MAX_EVENT_ID_CHARS)
        .map_or(event_id.len(), |(i, _)| i);
    let start = out.len();
    extension::escape_header(&event_id[..end], true, out);
    if out.len() - start > limit.class_id {
        let cut = extension::safe_cut(&out[start..], limit.class_id, false);
        out.truncate(start + cut);
    }
    out.extend_from_slice(b"|x09|");
}

/// Appends the tab-separated attributes: predefined keys first, then every
/// other non-empty field under its own name. When `entries` is given, each
/// pair's range is recorded for shortening.
pub(super) fn write_attributes(
    known: &KnownFields<'_>,
    out: &mut Vec<u8>,
    entries: Option<&mut Vec<Entry>>,
) -> u32 {
    let d = known.detection();
    let mut writer = ExtensionWriter::new(out, SEPARATOR, ValueEscape::Leef, entries);

    if let Some(category) = known.text(Field::Category) {
        writer.text("cat", &category, None, true);
    }
    writer.number("sev", i64::from(numeric_severity(known)), None, true);
    write_dev_time(&mut writer, known);
    if let Some(address) = known.text(Field::IpAddress) {
        if address.parse::<std::net::IpAddr>().is_ok() {
            writer.whole_text("src", &address, None, false);
        } else {
            writer.custom(d, "IpAddress", &address, is_reserved_key, false);
        }
    }
    for (field, key, keep) in [
        (Field::UserName, "usrName", false),
        (Field::UserDomain, "domain", false),
        (Field::ComputerDnsName, "identHostName", true),
        (Field::MachineName, "resource", true),
        (Field::Url, "url", false),
        (Field::Severity, "Severity", true),
    ] {
        if let Some(text) = known.text(field) {
            writer.text(key, &text, None, keep);
        }
    }
    // The header's EventID keeps only the first 255 characters and turns
    // line breaks and tabs into spaces, so such an IoaDefinitionId is
    // written whole as an attribute as well.
    let changed_in_header = |id: &str| id.chars().nth(MAX_EVENT_ID_CHARS).is_some() || extension::has_line_break(id) || id.contains('\t');
    if let Some(id) = known.text(Field::IoaDefinitionId).filter(|id| changed_in_header(id)) {
        writer.custom(d, "IoaDefinitionId", &id, is_reserved_key, false);
    }

    for (field, entry) in known.classified() {
        if field.is_some_and(is_mapped_field) {
            continue;
        }
        if let Some(text) = entry.value().text() {
            let keep = field.is_some_and(is_identifying_field);
            if field == Some(Field::FullId) {
                writer.primary(|writer| writer.custom(d, entry.name(), &text, is_reserved_key, keep));
            } else {
                writer.custom(d, entry.name(), &text, is_reserved_key, keep);
            }
        }
    }
    writer.dropped_keys
}

/// Writes `devTime` and `devTimeFormat` from `AlertTime`, or `AlertTime`
/// under its own name when it is not a valid timestamp.
fn write_dev_time(writer: &mut ExtensionWriter<'_>, known: &KnownFields<'_>) {
    let Some(text) = known.text(Field::AlertTime) else {
        return;
    };
    // `yyyy` has room for four digits, so other years keep the original text.
    match timefmt::parse(&text).filter(|t| (0..=9999).contains(&t.year())) {
        Some(t) => writer.pair(
            "devTime",
            Some(("devTimeFormat", DEV_TIME_FORMAT)),
            true,
            true,
            |out, _| write_dev_time_value(t, out),
        ),
        None => writer.custom(known.detection(), "AlertTime", &text, is_reserved_key, true),
    }
}

/// Appends `t` as `MMM dd yyyy HH:mm:ss.SSS z` in GMT, milliseconds
/// truncated. The text needs no escaping. The caller checks that the year
/// has at most four digits.
fn write_dev_time_value(t: DateTime<Utc>, out: &mut Vec<u8>) {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    out.extend_from_slice(MONTHS[t.month0() as usize].as_bytes());
    out.push(b' ');
    write_zero_padded(t.day(), 2, out);
    out.push(b' ');
    write_zero_padded(t.year().unsigned_abs(), 4, out);
    out.push(b' ');
    write_zero_padded(t.hour(), 2, out);
    out.push(b':');
    write_zero_padded(t.minute(), 2, out);
    out.push(b':');
    write_zero_padded(t.second(), 2, out);
    out.push(b'.');
    // A leap second has nanoseconds of 1e9 or more; clamp it into the second.
    write_zero_padded((t.nanosecond() / 1_000_000).min(999), 3, out);
    out.extend_from_slice(b" GMT");
}

/// Appends the last `digits` decimal digits of `value`, with leading zeros.
/// Callers pass values that have at most `digits` digits, as `{:0N}` would
/// write them.
fn write_zero_padded(value: u32, digits: u32, out: &mut Vec<u8>) {
    for place in (0..digits).rev() {
        out.push(b'0' + (value / 10u32.pow(place) % 10) as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detection(json: &str) -> Detection {
        Detection::from_json_text(json).unwrap()
    }

    fn leef(json: &str) -> String {
        let mut out = Vec::new();
        encode_leef(&detection(json), &LeefOptions::default(), &mut out);
        String::from_utf8(out).unwrap()
    }

    fn attributes(line: &str) -> Vec<&str> {
        let body = line.splitn(7, '|').nth(6).unwrap();
        body.split('\t').collect()
    }

    #[test]
    fn header_declares_tab_delimiter() {
        let line = leef(r#"{"IoaDefinitionId":"b20a","Category":"Malware"}"#);
        assert!(
            line.starts_with(
                "LEEF:2.0|Microsoft|Microsoft Defender ATP|2.0|b20a|x09|cat=Malware\t"
            ),
            "{line}"
        );
    }

    #[test]
    fn event_id_fallback_order() {
        assert!(
            leef(r#"{"ThreatName":"Emotet","Category":"Malware"}"#).contains("|2.0|Emotet|x09|")
        );
        assert!(
            leef(r#"{"IoaDefinitionId":"","Category":"Malware"}"#).contains("|2.0|Malware|x09|")
        );
    }

    #[test]
    fn event_id_is_cut_to_255_characters() {
        let long = "使".repeat(300);
        let line = leef(&format!(r#"{{"IoaDefinitionId":"{long}"}}"#));
        let event_id = line.split('|').nth(4).unwrap();
        assert_eq!(event_id.chars().count(), 255);
        // The whole value still reaches the SIEM, as an attribute.
        assert!(attributes(&line).contains(&format!("IoaDefinitionId={long}").as_str()), "{line}");
        let short = leef(&format!(r#"{{"IoaDefinitionId":"{}"}}"#, "a".repeat(255)));
        assert!(!short.contains("IoaDefinitionId="), "{short}");
    }

    #[test]
    fn header_escapes_pipe_backslash_and_breaks() {
        let line = leef(r#"{"IoaDefinitionId":"a|b\\c\r\nd\te"}"#);
        assert!(line.contains(r"|2.0|a\|b\\c d e|x09|"), "{line}");
        // The header changed it, so the attribute keeps it whole.
        assert!(attributes(&line).contains(&r"IoaDefinitionId=a|b\\c\r\nd\te"), "{line}");
    }

    #[test]
    fn predefined_keys_carry_mapped_fields() {
        let line = leef(
            r#"{"Category":"Malware","Severity":"High","AlertTime":"2020-09-30T14:09:20.35743Z",
                "IpAddress":"10.0.0.1","UserName":"alice","UserDomain":"CORP",
                "ComputerDnsName":"pc1.corp","MachineName":"pc1","Url":"http://x/y?a=b"}"#,
        );
        assert_eq!(
            attributes(&line),
            vec![
                "cat=Malware",
                "sev=8",
                "devTime=Sep 30 2020 14:09:20.357 GMT",
                "devTimeFormat=MMM dd yyyy HH:mm:ss.SSS z",
                "src=10.0.0.1",
                "usrName=alice",
                "domain=CORP",
                "identHostName=pc1.corp",
                "resource=pc1",
                "url=http://x/y?a=b",
                "Severity=High",
            ]
        );
    }

    #[test]
    fn sev_follows_severity_table() {
        for (severity, sev) in [
            ("Informational", "sev=1"),
            ("low", "sev=3"),
            ("Medium", "sev=5"),
            ("HIGH", "sev=8"),
            ("Severe", "sev=5"),
        ] {
            let line = leef(&format!(r#"{{"Severity":"{severity}"}}"#));
            assert!(attributes(&line).contains(&sev), "{severity}: {line}");
        }
        assert!(attributes(&leef("{}")).contains(&"sev=5"));
    }

    #[test]
    fn values_never_contain_raw_tab_or_breaks() {
        let line = leef(r#"{"Description":"a\tb\r\nc\\d=e|f","Other":"x\ty"}"#);
        let attributes = attributes(&line);
        assert!(
            attributes.contains(&r"Description=a\tb\r\nc\\d=e|f"),
            "{line}"
        );
        assert!(attributes.contains(&r"Other=x\ty"), "{line}");
        assert!(!line.contains('\n'));
        assert!(!line.contains('\r'));
    }

    #[test]
    fn invalid_values_go_under_own_names() {
        let line = leef(r#"{"IpAddress":"not-an-ip","AlertTime":"yesterday"}"#);
        let attributes = attributes(&line);
        assert!(attributes.contains(&"IpAddress=not-an-ip"), "{line}");
        assert!(attributes.contains(&"AlertTime=yesterday"), "{line}");
        assert!(!line.contains("src="));
        assert!(!line.contains("devTime="));
    }

    #[test]
    fn colliding_custom_key_gets_prefix() {
        let line = leef(r#"{"Category":"Malware","cat":"fake","sev":"10","mdesev":"x"}"#);
        let attributes = attributes(&line);
        assert!(attributes.contains(&"cat=Malware"), "{line}");
        assert!(attributes.contains(&"mdecat=fake"), "{line}");
        assert!(attributes.contains(&"mdemdesev=10"), "{line}");
        assert!(attributes.contains(&"mdesev=x"), "{line}");
    }

    #[test]
    fn non_plain_names_are_dropped_and_counted() {
        let mut out = Vec::new();
        let d = detection(r#"{"bad key":"x","a=b":"y","ok":"z","empty name":""}"#);
        let dropped = encode_leef(&d, &LeefOptions::default(), &mut out);
        assert_eq!(dropped, 2);
        assert!(String::from_utf8(out).unwrap().ends_with("sev=5\tok=z"));
    }

    #[test]
    fn dev_time_truncates_to_milliseconds() {
        let line = leef(r#"{"AlertTime":"2020-12-31T23:59:59.9999999Z"}"#);
        assert!(
            attributes(&line).contains(&"devTime=Dec 31 2020 23:59:59.999 GMT"),
            "{line}"
        );
    }

    #[test]
    fn dev_time_value_matches_padded_format() {
        use chrono::TimeZone;
        let times = [
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(7, 2, 9, 3, 4, 5).unwrap(),
            Utc.with_ymd_and_hms(2020, 9, 30, 14, 9, 20).unwrap() + chrono::Duration::milliseconds(357),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap() + chrono::Duration::nanoseconds(999_999_999),
            // A leap second: nanoseconds of 1e9 or more.
            chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
                .unwrap()
                .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
                .unwrap()
                .and_utc(),
        ];
        for t in times {
            let mut out = Vec::new();
            write_dev_time_value(t, &mut out);
            let millis = (t.nanosecond() / 1_000_000).min(999);
            let expected = format!(
                "{} {:02} {:04} {:02}:{:02}:{:02}.{millis:03} GMT",
                t.format("%b"),
                t.day(),
                t.year(),
                t.hour(),
                t.minute(),
                t.second()
            );
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{t:?}");
        }
    }

    #[test]
    fn dev_time_rejects_five_digit_year() {
        let line = leef(r#"{"AlertTime":"+10000-01-01T00:00:00Z"}"#);
        assert!(!line.contains("devTime="), "{line}");
    }

    #[test]
    fn nested_and_numeric_fields_are_kept() {
        let line = leef(r#"{"Extra":{"k":[1,"a\tb", 2E+1 ]},"AlertPart":0,"Flag":true}"#);
        let attributes = attributes(&line);
        assert!(attributes.contains(&r#"Extra={"k":[1,"a\\tb",2E+1]}"#), "{line}");
        assert!(attributes.contains(&"AlertPart=0"), "{line}");
        assert!(attributes.contains(&"Flag=true"), "{line}");
    }
}
