//! Syslog headers (RFC 5424 and RFC 3164), facilities and the severity of a
//! detection.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use super::HeaderFormat;
use crate::detection::Detection;

/// RFC 5424 limits HOSTNAME to 255 and APP-NAME to 48 printable characters.
const MAX_HOSTNAME_LEN: usize = 255;
const MAX_APP_NAME_LEN: usize = 48;
/// RFC 3164 limits the TAG to 32 characters.
const MAX_TAG_LEN: usize = 32;

const FACILITY_NAMES: [&str; 24] = [
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    "local0",
    "local1",
    "local2",
    "local3",
    "local4",
    "local5",
    "local6",
    "local7",
];

/// A syslog facility code, 0 to 23.
///
/// Parsed from a name (`kern`, `user`, `mail`, `daemon`, `auth`, `syslog`,
/// `lpr`, `news`, `uucp`, `cron`, `authpriv`, `ftp`, `local0` to `local7`)
/// or a number. Codes 12 to 15 have no accepted name because systems
/// disagree on them. The default is `user` (1), as in syslog(3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Facility(u8);

/// A facility name or number that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid syslog facility {0:?}: use kern, user, mail, daemon, auth, syslog, lpr, news, \
     uucp, cron, authpriv, ftp, local0 to local7, or a number from 0 to 23"
)]
pub struct FacilityError(String);

impl Facility {
    pub const USER: Self = Self(1);
    pub const LOCAL0: Self = Self(16);

    /// Returns the facility with code `code`, or an error above 23.
    pub fn new(code: u8) -> Result<Self, FacilityError> {
        if code <= 23 {
            Ok(Self(code))
        } else {
            Err(FacilityError(code.to_string()))
        }
    }

    pub fn code(self) -> u8 {
        self.0
    }
}

impl Default for Facility {
    fn default() -> Self {
        Self::USER
    }
}

impl FromStr for Facility {
    type Err = FacilityError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || FacilityError(text.to_owned());
        if let Ok(code) = text.parse::<u8>() {
            return Self::new(code).map_err(|_| invalid());
        }
        let code = FACILITY_NAMES
            .iter()
            .position(|name| name.eq_ignore_ascii_case(text))
            .filter(|&code| !(12..=15).contains(&code))
            .ok_or_else(invalid)?;
        // `position` is below 24, so the cast cannot truncate.
        Ok(Self(code as u8))
    }
}

impl fmt::Display for Facility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match FACILITY_NAMES.get(usize::from(self.0)) {
            Some(name) if !(12..=15).contains(&self.0) => f.write_str(name),
            _ => write!(f, "{}", self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Facility {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FacilityVisitor;

        impl Visitor<'_> for FacilityVisitor {
            type Value = Facility;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a syslog facility name such as local0, or a number from 0 to 23")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Facility, E> {
                text.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, code: u64) -> Result<Facility, E> {
                u8::try_from(code)
                    .ok()
                    .and_then(|code| Facility::new(code).ok())
                    .ok_or_else(|| E::custom(FacilityError(code.to_string())))
            }

            fn visit_i64<E: de::Error>(self, code: i64) -> Result<Facility, E> {
                match u64::try_from(code) {
                    Ok(code) => self.visit_u64(code),
                    Err(_) => Err(E::custom(FacilityError(code.to_string()))),
                }
            }
        }

        deserializer.deserialize_any(FacilityVisitor)
    }
}

/// Returns the syslog severity of a detection from its `Severity` text,
/// ignoring case and surrounding spaces: High 2 (critical), Medium 4
/// (warning), Low 5 (notice), Informational 6 (informational). Any other
/// value, or none, gives 4 (warning), so an unknown level is not hidden
/// among informational messages.
pub fn syslog_severity(d: &Detection) -> u8 {
    let text = d.text("Severity");
    let text = text.as_deref().map(str::trim).unwrap_or("");
    if text.eq_ignore_ascii_case("high") {
        2
    } else if text.eq_ignore_ascii_case("low") {
        5
    } else if text.eq_ignore_ascii_case("informational") {
        6
    } else {
        4
    }
}

/// A syslog header with its names checked once, when the encoder is built.
#[derive(Clone, Debug)]
pub(super) struct SyslogHeader {
    format: HeaderFormat,
    facility: Facility,
    hostname: String,
    app_name: String,
    tag: String,
}

impl SyslogHeader {
    pub(super) fn new(
        format: HeaderFormat,
        facility: Facility,
        hostname: &str,
        app_name: &str,
    ) -> Self {
        Self {
            format,
            facility,
            hostname: header_name(hostname, MAX_HOSTNAME_LEN, false),
            app_name: header_name(app_name, MAX_APP_NAME_LEN, false),
            tag: header_name(app_name, MAX_TAG_LEN, true),
        }
    }

    /// Appends the header for `d`, ending with the space before the payload.
    /// The timestamp is `AlertTime`, or `now` when that is missing or invalid.
    pub(super) fn write(&self, d: &Detection, now: DateTime<Utc>, out: &mut Vec<u8>) {
        if self.format == HeaderFormat::None {
            return;
        }
        let priority = self.facility.code() * 8 + syslog_severity(d);
        let time = d
            .alert_time()
            .filter(|t| (0..=9999).contains(&t.year()))
            .unwrap_or(now);

        out.push(b'<');
        push_decimal(out, u32::from(priority), 1);
        out.push(b'>');
        match self.format {
            HeaderFormat::Rfc5424 => {
                out.extend_from_slice(b"1 ");
                write_rfc5424_time(time, out);
                out.push(b' ');
                out.extend_from_slice(self.hostname.as_bytes());
                out.push(b' ');
                out.extend_from_slice(self.app_name.as_bytes());
                out.extend_from_slice(b" - - - ");
            }
            HeaderFormat::Rfc3164 => {
                write_rfc3164_time(time, out);
                out.push(b' ');
                out.extend_from_slice(self.hostname.as_bytes());
                out.push(b' ');
                out.extend_from_slice(self.tag.as_bytes());
                out.extend_from_slice(b": ");
            }
            HeaderFormat::None => {}
        }
    }
}

/// Returns `text` as a header name: printable US-ASCII (33 to 126) with
/// every other character replaced by `_`, at most `max_len` characters, and
/// `-` when empty. A TAG also has `:` replaced, since a colon ends it.
fn header_name(text: &str, max_len: usize, is_tag: bool) -> String {
    let name: String = text
        .chars()
        .take(max_len)
        .map(|c| match c {
            ':' if is_tag => '_',
            '!'..='~' => c,
            _ => '_',
        })
        .collect();
    if name.is_empty() {
        "-".to_owned()
    } else {
        name
    }
}

/// Appends `YYYY-MM-DDThh:mm:ss.ffffffZ`, truncated (never rounded) to
/// microseconds, the finest resolution RFC 5424 allows.
fn write_rfc5424_time(t: DateTime<Utc>, out: &mut Vec<u8>) {
    push_decimal(out, t.year().unsigned_abs(), 4);
    out.push(b'-');
    push_decimal(out, t.month(), 2);
    out.push(b'-');
    push_decimal(out, t.day(), 2);
    out.push(b'T');
    push_decimal(out, t.hour(), 2);
    out.push(b':');
    push_decimal(out, t.minute(), 2);
    out.push(b':');
    push_decimal(out, t.second(), 2);
    out.push(b'.');
    // A leap second has nanoseconds of 1e9 or more; clamp it into the second.
    push_decimal(out, (t.nanosecond() / 1_000).min(999_999), 6);
    out.push(b'Z');
}

/// Appends `Mmm dd hh:mm:ss` with the day padded by a space (`Dec  4`).
fn write_rfc3164_time(t: DateTime<Utc>, out: &mut Vec<u8>) {
    const MONTHS: [&[u8]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    out.extend_from_slice(MONTHS[t.month0() as usize]);
    out.push(b' ');
    if t.day() < 10 {
        out.push(b' ');
    }
    push_decimal(out, t.day(), 1);
    out.push(b' ');
    push_decimal(out, t.hour(), 2);
    out.push(b':');
    push_decimal(out, t.minute(), 2);
    out.push(b':');
    push_decimal(out, t.second(), 2);
}

/// Appends `n` in decimal, zero-padded to at least `width` digits.
fn push_decimal(out: &mut Vec<u8>, n: u32, width: usize) {
    let mut digits = [b'0'; 10];
    let mut rest = n;
    let mut len = 0;
    while rest > 0 || len == 0 {
        digits[digits.len() - 1 - len] = b'0' + (rest % 10) as u8;
        rest /= 10;
        len += 1;
    }
    let len = len.max(width).min(digits.len());
    out.extend_from_slice(&digits[digits.len() - len..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn detection(json: &str) -> Detection {
        Detection::from_json_text(json).unwrap()
    }

    fn header(format: HeaderFormat, json: &str) -> String {
        let header = SyslogHeader::new(format, Facility::LOCAL0, "host1", "mde-forwarder");
        let now = Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap();
        let mut out = Vec::new();
        header.write(&detection(json), now, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn rfc5424_header_uses_alert_time() {
        let text = header(
            HeaderFormat::Rfc5424,
            r#"{"Severity":"High","AlertTime":"2020-09-30T14:09:20.35743Z"}"#,
        );
        assert_eq!(
            text,
            "<130>1 2020-09-30T14:09:20.357430Z host1 mde-forwarder - - - "
        );
    }

    #[test]
    fn rfc5424_time_truncates_to_microseconds() {
        let text = header(
            HeaderFormat::Rfc5424,
            r#"{"AlertTime":"2020-12-31T23:59:59.9999999Z"}"#,
        );
        assert!(text.contains(" 2020-12-31T23:59:59.999999Z "), "{text}");
    }

    #[test]
    fn rfc5424_time_converts_offset_to_utc() {
        let text = header(
            HeaderFormat::Rfc5424,
            r#"{"AlertTime":"2020-09-30T16:00:00.5+02:00"}"#,
        );
        assert!(text.contains(" 2020-09-30T14:00:00.500000Z "), "{text}");
    }

    #[test]
    fn missing_or_invalid_alert_time_uses_now() {
        for json in [
            r#"{}"#,
            r#"{"AlertTime":null}"#,
            r#"{"AlertTime":"soon"}"#,
            r#"{"AlertTime":12}"#,
        ] {
            let text = header(HeaderFormat::Rfc5424, json);
            assert!(
                text.contains(" 2030-01-02T03:04:05.000000Z "),
                "{json}: {text}"
            );
        }
    }

    #[test]
    fn rfc3164_header_pads_day_with_space() {
        let text = header(
            HeaderFormat::Rfc3164,
            r#"{"Severity":"Low","AlertTime":"2020-12-04T05:06:07.9Z"}"#,
        );
        assert_eq!(text, "<133>Dec  4 05:06:07 host1 mde-forwarder: ");
    }

    #[test]
    fn rfc3164_header_keeps_two_digit_day() {
        let text = header(
            HeaderFormat::Rfc3164,
            r#"{"AlertTime":"2020-09-30T14:09:20Z"}"#,
        );
        assert_eq!(text, "<132>Sep 30 14:09:20 host1 mde-forwarder: ");
    }

    #[test]
    fn no_header_writes_nothing() {
        assert_eq!(header(HeaderFormat::None, r#"{"Severity":"High"}"#), "");
    }

    #[test]
    fn header_names_are_sanitized() {
        let header = SyslogHeader::new(HeaderFormat::Rfc5424, Facility::USER, "my host\n使", "");
        assert_eq!(header.hostname, "my_host__");
        assert_eq!(header.app_name, "-");
        assert_eq!(header.tag, "-");
    }

    #[test]
    fn header_names_are_cut_to_rfc_limits() {
        let long = "a".repeat(300);
        let header = SyslogHeader::new(HeaderFormat::Rfc5424, Facility::USER, &long, &long);
        assert_eq!(header.hostname.len(), 255);
        assert_eq!(header.app_name.len(), 48);
        assert_eq!(header.tag.len(), 32);
    }

    #[test]
    fn tag_replaces_colon() {
        let header = SyslogHeader::new(HeaderFormat::Rfc3164, Facility::USER, "h", "a:b");
        assert_eq!(header.tag, "a_b");
        assert_eq!(header.app_name, "a:b");
    }

    #[test]
    fn severity_maps_detection_levels() {
        for (text, expected) in [
            ("High", 2),
            ("high", 2),
            ("Medium", 4),
            ("Low", 5),
            (" LOW ", 5),
            ("Informational", 6),
            ("UnknownFutureLevel", 4),
        ] {
            let d = detection(&format!(r#"{{"Severity":"{text}"}}"#));
            assert_eq!(syslog_severity(&d), expected, "{text}");
        }
        assert_eq!(syslog_severity(&detection("{}")), 4);
        assert_eq!(syslog_severity(&detection(r#"{"Severity":null}"#)), 4);
        assert_eq!(syslog_severity(&detection(r#"{"Severity":3}"#)), 4);
    }

    #[test]
    fn facility_parses_names_and_numbers() {
        assert_eq!("kern".parse::<Facility>().unwrap().code(), 0);
        assert_eq!("authpriv".parse::<Facility>().unwrap().code(), 10);
        assert_eq!("ftp".parse::<Facility>().unwrap().code(), 11);
        assert_eq!("local0".parse::<Facility>().unwrap().code(), 16);
        assert_eq!("LOCAL7".parse::<Facility>().unwrap().code(), 23);
        assert_eq!("13".parse::<Facility>().unwrap().code(), 13);
        assert_eq!("0".parse::<Facility>().unwrap().code(), 0);
    }

    #[test]
    fn facility_rejects_unknown_values_by_name() {
        for text in ["local8", "24", "-1", "", "ntp", "256"] {
            let err = text.parse::<Facility>().unwrap_err();
            assert!(err.to_string().contains(&format!("{text:?}")), "{err}");
        }
    }

    #[test]
    fn facility_deserializes_from_string_or_number() {
        let name: Facility = serde_json::from_str(r#""local3""#).unwrap();
        assert_eq!(name.code(), 19);
        let number: Facility = serde_json::from_str("4").unwrap();
        assert_eq!(number.code(), 4);
        let err = serde_json::from_str::<Facility>("99").unwrap_err();
        assert!(err.to_string().contains("\"99\""), "{err}");
    }

    #[test]
    fn facility_displays_its_name() {
        assert_eq!(Facility::LOCAL0.to_string(), "local0");
        assert_eq!(Facility::new(13).unwrap().to_string(), "13");
    }

    #[test]
    fn priority_combines_facility_and_severity() {
        let header = SyslogHeader::new(HeaderFormat::Rfc5424, Facility::new(23).unwrap(), "h", "a");
        let mut out = Vec::new();
        header.write(
            &detection(r#"{"Severity":"Informational"}"#),
            Utc::now(),
            &mut out,
        );
        assert!(out.starts_with(b"<190>1 "));
    }
}
