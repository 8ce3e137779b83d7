//! Wire formats: turns a detection into the bytes a SIEM receives.
//!
//! Every encoder here is a pure function that appends to a caller's buffer,
//! so sinks reuse one `Vec<u8>` per connection and transports never see a
//! format. A message is built in three layers: the payload (CEF, LEEF or
//! JSON), an optional syslog header in front of it, and the framing that
//! separates messages on a stream.
//!
//! Invariant shared by all payloads: one detection is one line. Nothing a
//! detection contains can add a CR or LF to the message, so a receiver that
//! splits on line breaks gets exactly one event per detection.
//!
//! When a message must fit a UDP datagram (`max_message_bytes`), it is
//! shortened by dropping the longest optional values first. The result never
//! splits a UTF-8 sequence or an escape sequence. `docs/formats.md` lists the
//! field mappings and the shortening order.

mod cef;
mod extension;
mod hec;
mod json;
mod known;
mod leef;
mod syslog;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::detection::Detection;

pub use cef::{encode_cef, CefOptions};
pub use hec::{encode_hec_event, HecOptions};
pub use json::encode_json;
pub use leef::{encode_leef, LeefOptions};
pub use syslog::{syslog_severity, Facility, FacilityError};

/// Maximum lengths in bytes, escapes included, of the header fields taken
/// from a detection: the CEF Device Event Class ID (the LEEF EventID) and
/// the CEF Name.
#[derive(Clone, Copy, Debug)]
struct HeaderLimit {
    class_id: usize,
    name: usize,
}

impl HeaderLimit {
    /// Both fields whole.
    const NONE: Self = Self { class_id: usize::MAX, name: usize::MAX };

    /// CEF limits tried in turn when the header of a shortened message
    /// leaves no room for the FullId. The name (title) is cut in steps. The
    /// class ID is left out only at the end, because a cut one looks like
    /// another ID.
    const CEF_SHORTER: [Self; 5] = [
        Self { class_id: usize::MAX, name: 512 },
        Self { class_id: usize::MAX, name: 128 },
        Self { class_id: usize::MAX, name: 32 },
        Self { class_id: usize::MAX, name: 0 },
        Self { class_id: 0, name: 0 },
    ];

    /// The LEEF limit tried next: the EventID is left out.
    const LEEF_SHORTER: [Self; 1] = [Self { class_id: 0, name: usize::MAX }];
}

/// The payload inside each message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadFormat {
    /// ArcSight Common Event Format.
    Cef,
    /// QRadar Log Event Extended Format 2.0, tab-delimited.
    Leef,
    /// The detection's JSON object on one line.
    Json,
}

/// The syslog header written in front of the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderFormat {
    /// `<PRI>1 TIMESTAMP HOSTNAME APP-NAME - - - ` (RFC 5424).
    Rfc5424,
    /// `<PRI>Mmm dd hh:mm:ss HOSTNAME TAG: ` (RFC 3164, BSD syslog).
    Rfc3164,
    /// No header: the bare payload.
    None,
}

/// The separation of messages on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    /// A `\n` after each message (non-transparent framing, RFC 6587).
    Newline,
    /// `LEN ` in front of each message, LEN in bytes (RFC 6587, RFC 5425).
    OctetCounting,
    /// Nothing: one message per UDP datagram.
    None,
}

/// Settings of one sink's encoder.
#[derive(Clone, Debug)]
pub struct EncoderOptions {
    pub payload: PayloadFormat,
    pub header: HeaderFormat,
    pub framing: Framing,
    pub facility: Facility,
    /// HOSTNAME of the syslog header; invalid characters become `_`.
    pub hostname: String,
    /// APP-NAME (RFC 5424) or TAG (RFC 3164), normally `mde-forwarder`.
    pub app_name: String,
    pub cef: CefOptions,
    pub leef: LeefOptions,
    /// Maximum size in bytes of one message with its header and framing,
    /// for example the UDP datagram limit. `None` means no limit.
    pub max_message_bytes: Option<usize>,
}

/// The changes [`Encoder::encode`] made to write a detection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeOutcome {
    /// The message was shortened to fit `max_message_bytes`.
    pub shortened: bool,
    /// Shortening had to cut or drop the detection's FullId (or the whole
    /// message), so a SIEM cannot match the event to its detection.
    pub full_id_cut: bool,
    /// Custom keys left out because the field name is not plain ASCII
    /// letters and digits (CEF and LEEF only).
    pub dropped_keys: u32,
}

/// An encoder for one sink, built once from its options.
#[derive(Clone, Debug)]
pub struct Encoder {
    payload: PayloadFormat,
    header: syslog::SyslogHeader,
    framing: Framing,
    /// CEF or LEEF header up to the event ID, escaped once here.
    payload_prefix: Vec<u8>,
    max_message_bytes: Option<usize>,
}

impl Encoder {
    /// The payload format this encoder writes.
    pub fn payload(&self) -> PayloadFormat {
        self.payload
    }

    pub fn new(options: EncoderOptions) -> Self {
        let payload_prefix = match options.payload {
            PayloadFormat::Cef => cef::header_prefix(&options.cef),
            PayloadFormat::Leef => leef::header_prefix(&options.leef),
            PayloadFormat::Json => Vec::new(),
        };
        Self {
            payload: options.payload,
            header: syslog::SyslogHeader::new(
                options.header,
                options.facility,
                &options.hostname,
                &options.app_name,
            ),
            framing: options.framing,
            payload_prefix,
            max_message_bytes: options.max_message_bytes,
        }
    }

    /// Appends one complete wire message (header, payload and framing) for a
    /// detection. `now` is the syslog timestamp when `AlertTime` is missing
    /// or invalid. The outcome reports whether the message was shortened to
    /// fit `max_message_bytes`, and how many custom keys were dropped.
    pub fn encode(&self, d: &Detection, now: DateTime<Utc>, out: &mut Vec<u8>) -> EncodeOutcome {
        let message_start = out.len();
        self.header.write(d, now, out);
        let payload_start = out.len();
        let dropped_keys = self.write_payload(d, out, None, HeaderLimit::NONE);

        let mut shortened = false;
        let mut full_id_cut = false;
        if let Some(max) = self.max_message_bytes {
            let budget = message_budget(max, self.framing);
            if out.len() - message_start > budget {
                out.truncate(payload_start);
                full_id_cut = !self.write_shortened(d, out, message_start, budget);
                shortened = true;
            }
        }

        self.frame(out, message_start);
        if out.len() == message_start && shortened {
            full_id_cut = true;
        }
        EncodeOutcome {
            shortened,
            full_id_cut,
            dropped_keys,
        }
    }

    /// Appends the payload, with the CEF or LEEF header fields cut to
    /// `header_limit`.
    fn write_payload(
        &self,
        d: &Detection,
        out: &mut Vec<u8>,
        entries: Option<&mut Vec<extension::Entry>>,
        header_limit: HeaderLimit,
    ) -> u32 {
        match self.payload {
            PayloadFormat::Cef => {
                let known = known::KnownFields::read(d);
                cef::write_header(&self.payload_prefix, &known, header_limit, out);
                cef::write_extension(&known, out, entries)
            }
            PayloadFormat::Leef => {
                let known = known::KnownFields::read(d);
                leef::write_header(&self.payload_prefix, &known, header_limit, out);
                leef::write_attributes(&known, out, entries)
            }
            PayloadFormat::Json => {
                encode_json(d, out);
                0
            }
        }
    }

    /// Writes the payload again, this time keeping only what fits `budget`
    /// bytes counted from `message_start`. Returns false when the FullId
    /// had to be cut or dropped.
    fn write_shortened(
        &self,
        d: &Detection,
        out: &mut Vec<u8>,
        message_start: usize,
        budget: usize,
    ) -> bool {
        let separator = match self.payload {
            PayloadFormat::Cef => cef::SEPARATOR,
            PayloadFormat::Leef => leef::SEPARATOR,
            PayloadFormat::Json => return json::write_within(d, out, message_start, budget),
        };
        let payload_start = out.len();
        let mut entries = Vec::new();
        let mut attempt = |out: &mut Vec<u8>, header_limit: HeaderLimit| {
            out.truncate(payload_start);
            entries.clear();
            self.write_payload(d, out, Some(&mut entries), header_limit);
            // The extension starts where the first entry does, or at the end
            // when the detection produced no pairs at all.
            let extension_start = entries.first().map_or(out.len(), |e| e.start());
            extension::shorten(out, message_start, extension_start, &entries, separator, budget)
        };
        // A long title or class ID in the header can leave no room for the
        // FullId, so those are cut before the FullId is.
        let shorter: &[HeaderLimit] = match self.payload {
            PayloadFormat::Cef => &HeaderLimit::CEF_SHORTER,
            _ => &HeaderLimit::LEEF_SHORTER,
        };
        let limits = std::iter::once(HeaderLimit::NONE).chain(shorter.iter().copied());
        // When the FullId does not fit even so, the message keeps the first
        // (longest) header that leaves it valid, with as much of the
        // identifying pairs and the FullId as fits after it.
        let mut fallback = None;
        for header_limit in limits {
            let whole = attempt(out, header_limit);
            if whole.full_id {
                return true;
            }
            if whole.header && fallback.is_none() {
                fallback = Some(header_limit);
            }
        }
        attempt(out, fallback.unwrap_or(HeaderLimit::NONE));
        false
    }

    fn frame(&self, out: &mut Vec<u8>, message_start: usize) {
        match self.framing {
            Framing::Newline => out.push(b'\n'),
            Framing::OctetCounting => {
                let length = out.len() - message_start;
                let mut prefix = [0u8; 24];
                let prefix_len = write_decimal(&mut prefix, length);
                out.splice(
                    message_start..message_start,
                    prefix[..prefix_len].iter().copied(),
                );
            }
            Framing::None => {}
        }
        if let Some(max) = self.max_message_bytes {
            // A limit too small for even the framing of an empty message
            // yields no message at all rather than an oversized one.
            if out.len() - message_start > max {
                out.truncate(message_start);
            }
        }
    }
}

/// Returns the bytes left for header and payload once the framing of a
/// message of at most `max` bytes is taken off.
fn message_budget(max: usize, framing: Framing) -> usize {
    match framing {
        Framing::Newline => max.saturating_sub(1),
        // The length prefix of a shorter message has at most as many digits
        // as `max`, so this budget is safe, if up to one byte conservative.
        Framing::OctetCounting => max.saturating_sub(decimal_digits(max) + 1),
        Framing::None => max,
    }
}

fn decimal_digits(mut n: usize) -> usize {
    let mut digits = 1;
    while n >= 10 {
        n /= 10;
        digits += 1;
    }
    digits
}

/// Writes `n` followed by a space into `buffer`; returns the length written.
fn write_decimal(buffer: &mut [u8; 24], n: usize) -> usize {
    let digits = decimal_digits(n);
    let mut rest = n;
    for i in (0..digits).rev() {
        buffer[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    buffer[digits] = b' ';
    digits + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::value::RawValue;

    fn detection(json: &str) -> Detection {
        Detection::from_json_text(json).unwrap()
    }

    fn options(payload: PayloadFormat, header: HeaderFormat, framing: Framing) -> EncoderOptions {
        EncoderOptions {
            payload,
            header,
            framing,
            facility: Facility::LOCAL0,
            hostname: "fwd1".to_owned(),
            app_name: "mde-forwarder".to_owned(),
            cef: CefOptions::default(),
            leef: LeefOptions::default(),
            max_message_bytes: None,
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap()
    }

    fn encode(options: EncoderOptions, d: &Detection) -> (Vec<u8>, EncodeOutcome) {
        let mut out = Vec::new();
        let outcome = Encoder::new(options).encode(d, now(), &mut out);
        (out, outcome)
    }

    fn sample_detections() -> Vec<Detection> {
        let text = std::fs::read_to_string("tests/data/detections.json").unwrap();
        let items: Vec<Box<RawValue>> = serde_json::from_str(&text).unwrap();
        items
            .iter()
            .map(|item| Detection::from_raw(item).unwrap())
            .collect()
    }

    /// Builds a detection with long optional values full of multibyte text
    /// and characters that need escaping, plus every identifying field.
    fn hostile_detection() -> Detection {
        let long_path = r"C:\Users\使用者\文件\專案=|".repeat(12);
        let json = serde_json::json!({
            "AlertTime": "2020-09-30T14:09:20.9999999Z",
            "AlertTitle": "Title | with \\ pipes\r\nand breaks",
            "Category": "Malware",
            "Severity": "High",
            "AlertId": "da637370718981685665_16349121",
            "FullId": "da637370718981685665_16349121:R4xEdgAvDb2LQl3BgHoA3NYqKmRSiIAG7dpxAJCYZhY=",
            "LastProcessedTimeUtc": "2020-09-30T14:11:44.0779765Z",
            "MachineName": "mymachine1",
            "ComputerDnsName": "mymachine1.domain.com",
            "CommandLine": format!("cmd.exe /c \"{long_path}\"\r\n\tnext"),
            "FilePath": long_path,
            "Description": "多行\n描述 = 值\\".repeat(20),
            "Evidence": { "paths": ["a=b", "c\td", "使用者"] },
            "Url": "http://example.net/?a=b&c=d",
        });
        detection(&json.to_string())
    }

    #[test]
    fn newline_framing_appends_line_feed() {
        let d = detection(r#"{"Severity":"High"}"#);
        let (out, _) = encode(
            options(PayloadFormat::Cef, HeaderFormat::None, Framing::Newline),
            &d,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "CEF:0|Microsoft|Microsoft Defender ATP|2.0|||8|Severity=High\n"
        );
    }

    #[test]
    fn no_framing_adds_nothing() {
        let d = detection(r#"{"Severity":"High"}"#);
        let (out, _) = encode(
            options(PayloadFormat::Json, HeaderFormat::None, Framing::None),
            &d,
        );
        assert_eq!(String::from_utf8(out).unwrap(), r#"{"Severity":"High"}"#);
    }

    #[test]
    fn octet_counting_counts_bytes_not_characters() {
        let d = detection(r#"{"UserName":"使用者"}"#);
        let (out, _) = encode(
            options(
                PayloadFormat::Json,
                HeaderFormat::None,
                Framing::OctetCounting,
            ),
            &d,
        );
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, r#"24 {"UserName":"使用者"}"#);
        let (length, message) = text.split_once(' ').unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), message.len());
        assert_ne!(message.len(), message.chars().count());
    }

    #[test]
    fn octet_counting_includes_syslog_header() {
        let d = detection(r#"{"Severity":"Low","AlertTime":"2020-09-30T14:09:20Z"}"#);
        let (out, _) = encode(
            options(
                PayloadFormat::Json,
                HeaderFormat::Rfc5424,
                Framing::OctetCounting,
            ),
            &d,
        );
        let text = String::from_utf8(out).unwrap();
        let (length, message) = text.split_once(' ').unwrap();
        assert_eq!(length.parse::<usize>().unwrap(), message.len());
        assert!(
            message.starts_with("<133>1 2020-09-30T14:09:20.000000Z fwd1 mde-forwarder - - - {"),
            "{message}"
        );
    }

    #[test]
    fn encode_appends_after_existing_bytes() {
        let d = detection(r#"{"Severity":"High"}"#);
        let encoder = Encoder::new(options(
            PayloadFormat::Json,
            HeaderFormat::None,
            Framing::OctetCounting,
        ));
        let mut out = b"previous".to_vec();
        encoder.encode(&d, now(), &mut out);
        encoder.encode(&d, now(), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"previous19 {"Severity":"High"}19 {"Severity":"High"}"#
        );
    }

    #[test]
    fn rfc5424_cef_message_is_complete() {
        let d = detection(
            r#"{"AlertTime":"2020-09-30T14:09:20.35743Z","AlertTitle":"T","Category":"Malware","Severity":"Medium"}"#,
        );
        let (out, outcome) = encode(
            options(PayloadFormat::Cef, HeaderFormat::Rfc5424, Framing::Newline),
            &d,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<132>1 2020-09-30T14:09:20.357430Z fwd1 mde-forwarder - - - \
             CEF:0|Microsoft|Microsoft Defender ATP|2.0|Malware|T|5|cat=Malware rt=1601474960357 Severity=Medium\n"
        );
        assert_eq!(
            outcome,
            EncodeOutcome {
                shortened: false,
                full_id_cut: false,
                dropped_keys: 0
            }
        );
    }

    #[test]
    fn rfc3164_leef_message_is_complete() {
        let d = detection(
            r#"{"AlertTime":"2020-12-04T05:06:07Z","Category":"Malware","Severity":"Informational"}"#,
        );
        let (out, _) = encode(
            options(PayloadFormat::Leef, HeaderFormat::Rfc3164, Framing::None),
            &d,
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "<134>Dec  4 05:06:07 fwd1 mde-forwarder: LEEF:2.0|Microsoft|Microsoft Defender ATP|2.0|Malware|x09|\
             cat=Malware\tsev=1\tdevTime=Dec 04 2020 05:06:07.000 GMT\tdevTimeFormat=MMM dd yyyy HH:mm:ss.SSS z\tSeverity=Informational"
        );
    }

    #[test]
    fn dropped_keys_are_reported() {
        let d = detection(r#"{"bad key":"x","ok":"y"}"#);
        let (_, outcome) = encode(
            options(PayloadFormat::Cef, HeaderFormat::None, Framing::None),
            &d,
        );
        assert_eq!(outcome.dropped_keys, 1);
        assert!(!outcome.shortened);
    }

    #[test]
    fn sample_detections_encode_to_one_line_each() {
        for payload in [PayloadFormat::Cef, PayloadFormat::Leef, PayloadFormat::Json] {
            let encoder = Encoder::new(options(payload, HeaderFormat::Rfc5424, Framing::Newline));
            let mut out = Vec::new();
            let detections = sample_detections();
            for d in &detections {
                encoder.encode(d, now(), &mut out);
            }
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains('\r'), "{payload:?} wrote a CR");
            assert_eq!(text.lines().count(), detections.len(), "{payload:?}");
            assert!(text.ends_with('\n'), "{payload:?}");
        }
    }

    #[test]
    fn hostile_detection_is_one_line_in_every_format() {
        let d = hostile_detection();
        for payload in [PayloadFormat::Cef, PayloadFormat::Leef, PayloadFormat::Json] {
            let (out, _) = encode(options(payload, HeaderFormat::Rfc5424, Framing::None), &d);
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains(['\r', '\n']), "{payload:?}: {text}");
        }
    }

    #[test]
    fn leef_values_contain_no_raw_tab() {
        let d = hostile_detection();
        let (out, _) = encode(
            options(PayloadFormat::Leef, HeaderFormat::None, Framing::None),
            &d,
        );
        let text = String::from_utf8(out).unwrap();
        let attributes = text.splitn(7, '|').nth(6).unwrap();
        for attribute in attributes.split('\t') {
            let (key, _) = attribute.split_once('=').unwrap();
            assert!(
                key.bytes().all(|b| b.is_ascii_alphanumeric()),
                "attribute {attribute:?} does not start with a key"
            );
        }
    }

    /// Returns the first backslash escape in `message` that is not one of
    /// the escapes CEF, LEEF and the CEF header produce.
    fn broken_escape(message: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < message.len() {
            if message[i] == b'\\' {
                if !matches!(
                    message.get(i + 1),
                    Some(b'\\' | b'=' | b'|' | b'r' | b'n' | b't')
                ) {
                    return Some(i);
                }
                i += 1;
            }
            i += 1;
        }
        None
    }

    /// Returns the position of the first unescaped `=` followed by a space
    /// or the end of a CEF message: a key written with an empty value.
    fn empty_value(message: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < message.len() {
            match message[i] {
                b'\\' => i += 1,
                b'=' if matches!(message.get(i + 1), None | Some(b' ')) => return Some(i),
                _ => {}
            }
            i += 1;
        }
        None
    }

    #[test]
    fn udp_limit_is_never_exceeded() {
        let d = hostile_detection();
        for payload in [PayloadFormat::Cef, PayloadFormat::Leef, PayloadFormat::Json] {
            for framing in [Framing::None, Framing::OctetCounting, Framing::Newline] {
                let full_len = encode(options(payload, HeaderFormat::Rfc5424, framing), &d)
                    .0
                    .len();
                for max in (0..full_len + 8).step_by(3) {
                    let mut o = options(payload, HeaderFormat::Rfc5424, framing);
                    o.max_message_bytes = Some(max);
                    let (out, outcome) = encode(o, &d);
                    let context = format!("{payload:?} {framing:?} max {max}");
                    assert!(out.len() <= max, "{context}: {} bytes", out.len());
                    assert!(std::str::from_utf8(&out).is_ok(), "{context}: split UTF-8");
                    assert_eq!(
                        outcome.shortened,
                        full_len > max,
                        "{context}: shortened flag"
                    );
                }
            }
        }
    }

    #[test]
    fn udp_shortening_never_splits_an_escape() {
        let d = hostile_detection();
        for payload in [PayloadFormat::Cef, PayloadFormat::Leef] {
            let full_len = encode(options(payload, HeaderFormat::None, Framing::None), &d)
                .0
                .len();
            for max in 0..full_len {
                let mut o = options(payload, HeaderFormat::None, Framing::None);
                o.max_message_bytes = Some(max);
                let (out, _) = encode(o, &d);
                assert_eq!(
                    broken_escape(&out),
                    None,
                    "{payload:?} max {max}: {}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
    }

    #[test]
    fn udp_shortening_never_writes_empty_value() {
        let d = hostile_detection();
        let full_len = encode(
            options(PayloadFormat::Cef, HeaderFormat::None, Framing::None),
            &d,
        )
        .0
        .len();
        for max in 0..full_len {
            let mut o = options(PayloadFormat::Cef, HeaderFormat::None, Framing::None);
            o.max_message_bytes = Some(max);
            let (out, _) = encode(o, &d);
            assert_eq!(
                empty_value(&out),
                None,
                "max {max}: {}",
                String::from_utf8_lossy(&out)
            );
        }
    }

    #[test]
    fn udp_shortening_keeps_identifying_cef_fields() {
        let d = hostile_detection();
        let mut o = options(PayloadFormat::Cef, HeaderFormat::Rfc5424, Framing::None);
        o.max_message_bytes = Some(700);
        let (out, outcome) = encode(o, &d);
        let text = String::from_utf8(out).unwrap();
        assert!(outcome.shortened);
        for key in [
            " externalId=",
            " cs3=",
            " rt=",
            "|cat=",
            " shost=",
            " dvchost=",
            " Severity=High",
            " deviceCustomDate1=",
        ] {
            assert!(text.contains(key), "{key} missing: {text}");
        }
        assert!(
            !text.contains(" cs2="),
            "longest optional value kept: {text}"
        );
        assert!(
            text.starts_with("<130>1 2020-09-30T14:09:20.999999Z fwd1 mde-forwarder - - - CEF:0|"),
            "{text}"
        );
    }

    #[test]
    fn udp_shortening_drops_longest_optional_first() {
        let d = detection(&format!(
            r#"{{"AlertId":"a","Long":"{}","Short":"{}"}}"#,
            "x".repeat(200),
            "y".repeat(100)
        ));
        let full_len = encode(
            options(PayloadFormat::Cef, HeaderFormat::None, Framing::None),
            &d,
        )
        .0
        .len();
        let mut o = options(PayloadFormat::Cef, HeaderFormat::None, Framing::None);
        o.max_message_bytes = Some(full_len - 50);
        let (out, _) = encode(o, &d);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("Long="), "{text}");
        assert!(
            text.contains(&format!("Short={}", "y".repeat(100))),
            "{text}"
        );
        assert!(text.contains("externalId=a"), "{text}");
    }

    #[test]
    fn udp_shortening_gives_full_id_room() {
        let d = detection(&format!(
            r#"{{"AlertId":"a","FullId":"{}"}}"#,
            "使".repeat(100)
        ));
        let mut o = options(PayloadFormat::Cef, HeaderFormat::None, Framing::None);
        o.max_message_bytes = Some(120);
        let (out, _) = encode(o, &d);
        let text = String::from_utf8(out).unwrap();
        assert!(text.len() <= 120, "{} bytes", text.len());
        // The FullId gets all the room: a longer part of it matches better
        // than the AlertId beside a shorter one.
        assert!(text.contains("|5|cs3=使"), "{text}");
        assert!(text.ends_with(" cs3Label=FullId"), "{text}");
    }

    /// Numbers, timestamps and addresses are dropped when the message must
    /// be shortened, never cut: a cut one still looks valid (`rt=179646`).
    #[test]
    fn udp_shortening_never_cuts_numbers_times_or_addresses() {
        let mut json: serde_json::Value = serde_json::from_str(&hostile_detection().raw().to_string()).unwrap();
        json["IpAddress"] = serde_json::json!("2001:db8:aaaa:bbbb:cccc:dddd:eeee:1");
        json["ReportID"] = serde_json::json!(1234567890123_i64);
        let d = detection(&json.to_string());
        let cases = [
            (PayloadFormat::Cef, ' ', ["rt", "deviceCustomDate1", "src", "cn3"].as_slice()),
            (PayloadFormat::Leef, '\t', ["devTime", "sev", "src", "LastProcessedTimeUtc"].as_slice()),
        ];
        for (payload, separator, keys) in cases {
            let full = encode(options(payload, HeaderFormat::None, Framing::None), &d).0;
            let full = String::from_utf8(full).unwrap();
            let value_of = |text: &str, key: &str| {
                let start = text.find(&format!("{separator}{key}="))? + key.len() + 2;
                let rest = &text[start..];
                // A devTime value contains spaces, so a LEEF value ends at the next tab.
                let end = if separator == ' ' { rest.find(' ') } else { rest.find('\t') };
                Some(rest[..end.unwrap_or(rest.len())].to_string())
            };
            for key in keys {
                assert!(value_of(&full, key).is_some(), "{payload:?}: {key} missing in {full}");
            }
            for max in 0..full.len() {
                let mut o = options(payload, HeaderFormat::None, Framing::None);
                o.max_message_bytes = Some(max);
                let (out, _) = encode(o, &d);
                let text = String::from_utf8(out).unwrap();
                for key in keys {
                    if let Some(value) = value_of(&text, key) {
                        assert_eq!(Some(&value), value_of(&full, key).as_ref(), "{payload:?} max {max}: {key} cut in {text}");
                    }
                }
            }
        }
    }

    /// Dropping a long whole pair may free more room than was missing: an
    /// identifying pair dropped before it is put back when it fits.
    #[test]
    fn udp_shortening_restores_pairs_that_fit() {
        let d = detection(
            r#"{"AlertId":"a","FullId":"f","Severity":"High","AlertTime":"2020-09-30T14:09:20.9999999Z","Category":"Malware"}"#,
        );
        let full_len = encode(options(PayloadFormat::Cef, HeaderFormat::None, Framing::None), &d).0.len();
        for max in 0..full_len {
            let mut o = options(PayloadFormat::Cef, HeaderFormat::None, Framing::None);
            o.max_message_bytes = Some(max);
            let text = String::from_utf8(encode(o, &d).0).unwrap();
            assert!(text.len() <= max, "max {max}: {text}");
            let extension = &text[text.rfind('|').map_or(0, |i| i + 1)..];
            if !extension.is_empty() && !text.contains("Severity=High") {
                assert!(text.len() + " Severity=High".len() > max, "max {max}: Severity=High fits in {text}");
            }
        }
    }

    #[test]
    fn udp_shortening_keeps_identifying_leef_fields() {
        let d = hostile_detection();
        let mut o = options(PayloadFormat::Leef, HeaderFormat::Rfc5424, Framing::None);
        o.max_message_bytes = Some(700);
        let (out, outcome) = encode(o, &d);
        let text = String::from_utf8(out).unwrap();
        assert!(outcome.shortened);
        for key in [
            "|cat=",
            "\tsev=8",
            "\tdevTime=",
            "\tidentHostName=",
            "\tresource=",
            "\tAlertId=",
            "\tFullId=",
        ] {
            assert!(text.contains(key), "{key:?} missing: {text}");
        }
        assert!(
            !text.contains("\tCommandLine="),
            "longest optional value kept: {text}"
        );
    }

    #[test]
    fn udp_shortened_json_stays_valid() {
        let d = hostile_detection();
        let (full, _) = encode(
            options(PayloadFormat::Json, HeaderFormat::Rfc5424, Framing::None),
            &d,
        );
        let header_len = full.iter().position(|&b| b == b'{').unwrap();
        for max in 0..full.len() {
            let mut o = options(PayloadFormat::Json, HeaderFormat::Rfc5424, Framing::None);
            o.max_message_bytes = Some(max);
            let (out, _) = encode(o, &d);
            let Some(start) = out.iter().position(|&b| b == b'{') else {
                assert!(
                    max < header_len + 2,
                    "max {max}: no JSON in {}",
                    String::from_utf8_lossy(&out)
                );
                continue;
            };
            let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&out[start..]);
            assert!(
                parsed.is_ok(),
                "max {max}: {}",
                String::from_utf8_lossy(&out)
            );
        }
    }

    #[test]
    fn udp_shortened_json_keeps_protected_fields() {
        let d = hostile_detection();
        let mut o = options(PayloadFormat::Json, HeaderFormat::None, Framing::None);
        o.max_message_bytes = Some(400);
        let (out, outcome) = encode(o, &d);
        assert!(outcome.shortened);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for field in ["FullId", "AlertId", "LastProcessedTimeUtc", "AlertTime"] {
            let expected = d.get(field).and_then(crate::detection::FieldValue::as_str);
            assert_eq!(value.get(field).and_then(serde_json::Value::as_str), expected, "{field}");
        }
        assert_eq!(value.get("CommandLine"), None);
    }

    #[test]
    fn message_within_limit_is_unchanged() {
        let d = hostile_detection();
        let (full, _) = encode(
            options(PayloadFormat::Cef, HeaderFormat::Rfc5424, Framing::None),
            &d,
        );
        let mut o = options(PayloadFormat::Cef, HeaderFormat::Rfc5424, Framing::None);
        o.max_message_bytes = Some(full.len());
        let (out, outcome) = encode(o, &d);
        assert_eq!(out, full);
        assert!(!outcome.shortened);
    }

    /// Returns the FullId pair as each format writes it whole, and what may
    /// follow it.
    fn whole_full_id(payload: PayloadFormat, full_id: &str) -> (String, &'static [&'static str]) {
        match payload {
            PayloadFormat::Cef => (format!("cs3={} cs3Label=FullId", full_id.replace('=', "\\=")), &[" ", ""]),
            PayloadFormat::Leef => (format!("FullId={full_id}"), &["\t", ""]),
            PayloadFormat::Json => (format!("\"FullId\":\"{full_id}\""), &[",", "}"]),
        }
    }

    /// Returns whether `text` contains the FullId whole, not cut short.
    fn has_whole_full_id(payload: PayloadFormat, text: &str, full_id: &str) -> bool {
        let (pair, ends) = whole_full_id(payload, full_id);
        let text = text.strip_suffix('\n').unwrap_or(text);
        text.match_indices(&pair).any(|(at, _)| {
            let rest = &text[at + pair.len()..];
            ends.iter().any(|end| if end.is_empty() { rest.is_empty() } else { rest.starts_with(end) })
        })
    }

    /// `full_id_cut` is exactly "the FullId is not in the message whole",
    /// at every limit, in every format.
    #[test]
    fn full_id_cut_flag_matches_output() {
        let d = hostile_detection();
        let full_id = d.text("FullId").unwrap().into_owned();
        for payload in [PayloadFormat::Cef, PayloadFormat::Leef, PayloadFormat::Json] {
            let full_len = encode(options(payload, HeaderFormat::Rfc5424, Framing::Newline), &d).0.len();
            let mut cut_seen = false;
            for max in (0..=full_len + 1).rev() {
                let mut o = options(payload, HeaderFormat::Rfc5424, Framing::Newline);
                o.max_message_bytes = Some(max);
                let (out, outcome) = encode(o, &d);
                let text = String::from_utf8(out).unwrap();
                assert_eq!(outcome.full_id_cut, !has_whole_full_id(payload, &text, &full_id), "{payload:?} max {max}: {text}");
                assert_eq!(outcome.shortened, max < full_len, "{payload:?} max {max}");
                // Once the FullId is cut, a smaller limit never brings it back.
                assert!(!cut_seen || outcome.full_id_cut, "{payload:?} max {max}: {text}");
                cut_seen |= outcome.full_id_cut;
            }
            assert!(cut_seen, "{payload:?}: the FullId was never cut");
        }
    }

    /// A cut host name or ID still looks valid, so shortening drops those
    /// identifying values and never cuts them, at every limit.
    #[test]
    fn udp_shortening_never_cuts_identifying_text() {
        let d = hostile_detection();
        let cases: [(PayloadFormat, char, &[(&str, &str)]); 2] = [
            (
                PayloadFormat::Cef,
                ' ',
                &[("externalId", "da637370718981685665_16349121"), ("shost", "mymachine1"), ("dvchost", "mymachine1.domain.com"), ("cat", "Malware"), ("Severity", "High")],
            ),
            (
                PayloadFormat::Leef,
                '\t',
                &[("AlertId", "da637370718981685665_16349121"), ("resource", "mymachine1"), ("identHostName", "mymachine1.domain.com"), ("cat", "Malware"), ("Severity", "High")],
            ),
        ];
        for (payload, separator, identifying) in cases {
            let full_len = encode(options(payload, HeaderFormat::None, Framing::None), &d).0.len();
            for max in 0..full_len {
                let mut o = options(payload, HeaderFormat::None, Framing::None);
                o.max_message_bytes = Some(max);
                let text = String::from_utf8(encode(o, &d).0).unwrap();
                for (key, value) in identifying {
                    for prefix in [format!("{separator}{key}="), format!("|{key}=")] {
                        for (at, _) in text.match_indices(&prefix) {
                            let rest = &text[at + prefix.len()..];
                            let written = rest.split(separator).next().unwrap();
                            assert_eq!(written, *value, "{payload:?} max {max}: {text}");
                        }
                    }
                }
            }
        }
    }

    /// Identifying values longer than the limit are dropped before the
    /// FullId is cut.
    #[test]
    fn udp_shortening_cuts_full_id_last() {
        let full_id = "da637370718981685665_16349121:R4xEdgAvDb2LQl3BgHoA3NYqKmRSiIAG7dpxAJCYZhY=";
        let d = detection(
            &serde_json::json!({
                "AlertId": "a".repeat(3000),
                "FullId": full_id,
                "MachineName": "m".repeat(3000),
                "ComputerDnsName": "c".repeat(3000),
                "Category": "k".repeat(3000),
                "Severity": "s".repeat(3000),
                "LastProcessedTimeUtc": "2020-09-30T14:11:44.0779765Z",
                "AlertTime": "t".repeat(3000),
            })
            .to_string(),
        );
        for payload in [PayloadFormat::Cef, PayloadFormat::Leef, PayloadFormat::Json] {
            let mut o = options(payload, HeaderFormat::Rfc5424, Framing::Newline);
            o.max_message_bytes = Some(1024);
            let (out, outcome) = encode(o, &d);
            let text = String::from_utf8(out).unwrap();
            assert!(text.len() <= 1024, "{payload:?}: {} bytes", text.len());
            assert!(outcome.shortened, "{payload:?}: {outcome:?}");
            assert!(!outcome.full_id_cut, "{payload:?}: {outcome:?}");
            assert!(has_whole_full_id(payload, &text, full_id), "{payload:?}: {text}");
        }
    }

    /// Counts the `|` in `text` that are not escaped as `\|`.
    fn unescaped_pipes(text: &str) -> usize {
        let mut count = 0;
        let mut bytes = text.bytes();
        while let Some(byte) = bytes.next() {
            match byte {
                b'\\' => {
                    bytes.next();
                }
                b'|' => count += 1,
                _ => {}
            }
        }
        count
    }

    /// A title or class ID too long for the datagram is cut in the CEF
    /// header, so the FullId still arrives.
    #[test]
    fn long_cef_title_cut_before_full_id() {
        let full_id = "da637370718981685665_16349121:R4xEdgAvDb2LQl3BgHoA3NYqKmRSiIAG7dpxAJCYZhY=";
        for (title, class_id) in [("T|".repeat(40_000), "Malware".to_owned()), ("Title".to_owned(), "\\".repeat(40_000))] {
            let d = detection(
                &serde_json::json!({
                    "AlertTitle": title,
                    "IoaDefinitionId": class_id,
                    "FullId": full_id,
                    "AlertId": "da637370718981685665_16349121",
                    "Severity": "High",
                })
                .to_string(),
            );
            let mut o = options(PayloadFormat::Cef, HeaderFormat::Rfc5424, Framing::Newline);
            o.max_message_bytes = Some(2048);
            let (out, outcome) = encode(o, &d);
            let text = String::from_utf8(out).unwrap();
            assert!(text.len() <= 2048, "{} bytes", text.len());
            assert!(outcome.shortened, "{outcome:?}: {text}");
            assert!(!outcome.full_id_cut, "{outcome:?}: {text}");
            assert!(has_whole_full_id(PayloadFormat::Cef, &text, full_id), "{text}");
            assert_eq!(broken_escape(text.as_bytes()), None, "{text}");
            assert_eq!(unescaped_pipes(&text), 7, "header fields: {text}");
        }
    }

    /// A LEEF EventID too long for the datagram is left out of the header,
    /// so the FullId still arrives.
    #[test]
    fn long_leef_event_id_left_out() {
        let d = detection(&serde_json::json!({ "IoaDefinitionId": "𝄞".repeat(255), "FullId": "C-fid", "Severity": "High" }).to_string());
        let mut o = options(PayloadFormat::Leef, HeaderFormat::Rfc5424, Framing::Newline);
        o.max_message_bytes = Some(1024);
        let (out, outcome) = encode(o, &d);
        let text = String::from_utf8(out).unwrap();
        assert!(text.len() <= 1024, "{} bytes", text.len());
        assert!(!outcome.full_id_cut, "{text}");
        assert!(text.contains("|2.0||x09|"), "{text}");
        assert!(has_whole_full_id(PayloadFormat::Leef, &text, "C-fid"), "{text}");
    }

    /// When the FullId alone is too long, the message still keeps a valid
    /// CEF header and the start of the FullId, instead of a header cut off.
    #[test]
    fn doomed_full_id_keeps_valid_header() {
        let full_id = "F".repeat(3000);
        let d = detection(&serde_json::json!({ "AlertTitle": "T".repeat(3000), "FullId": full_id, "AlertId": "a-1", "Severity": "High" }).to_string());
        let mut o = options(PayloadFormat::Cef, HeaderFormat::Rfc5424, Framing::Newline);
        o.max_message_bytes = Some(2048);
        let (out, outcome) = encode(o, &d);
        let text = String::from_utf8(out).unwrap();
        assert!(text.len() <= 2048, "{} bytes", text.len());
        assert!(outcome.full_id_cut);
        assert_eq!(unescaped_pipes(&text), 7, "{text}");
        assert!(text.contains("|8|cs3=FFFF"), "{text}");
        assert!(text.len() > 2000, "the FullId fills the datagram: {} bytes", text.len());
    }

    /// A numeric FullId cut short is another valid number, so CEF and LEEF
    /// drop it, as JSON does, instead of cutting it.
    #[test]
    fn numeric_full_id_never_cut() {
        let full_id = "9".repeat(600);
        let d = detection(&format!(r#"{{"FullId":{full_id},"AlertId":"a-1","Severity":"High"}}"#));
        for payload in [PayloadFormat::Cef, PayloadFormat::Leef, PayloadFormat::Json] {
            let mut o = options(payload, HeaderFormat::Rfc5424, Framing::Newline);
            o.max_message_bytes = Some(480);
            let (out, outcome) = encode(o, &d);
            let text = String::from_utf8(out).unwrap();
            assert!(outcome.full_id_cut, "{payload:?}: {text}");
            assert!(!text.contains("999"), "{payload:?}: a cut number was sent: {text}");
        }
    }

    #[test]
    fn payload_formats_deserialize_lowercase() {
        let formats: Vec<PayloadFormat> = serde_json::from_str(r#"["cef","leef","json"]"#).unwrap();
        assert_eq!(
            formats,
            vec![PayloadFormat::Cef, PayloadFormat::Leef, PayloadFormat::Json]
        );
        let headers: Vec<HeaderFormat> =
            serde_json::from_str(r#"["rfc5424","rfc3164","none"]"#).unwrap();
        assert_eq!(
            headers,
            vec![
                HeaderFormat::Rfc5424,
                HeaderFormat::Rfc3164,
                HeaderFormat::None
            ]
        );
        let framings: Vec<Framing> =
            serde_json::from_str(r#"["newline","octet-counting","none"]"#).unwrap();
        assert_eq!(
            framings,
            vec![Framing::Newline, Framing::OctetCounting, Framing::None]
        );
    }
}
