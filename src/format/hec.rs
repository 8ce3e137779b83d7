//! Splunk HTTP Event Collector event objects: one JSON object per detection,
//! with the detection's text placed in `event` exactly as the API sent it.

use chrono::{DateTime, Utc};

use crate::detection::Detection;

/// The metadata fields of every event a HEC sink writes.
#[derive(Clone, Debug)]
pub struct HecOptions {
    pub source: String,
    pub sourcetype: String,
    pub index: Option<String>,
}

/// Appends `{"time":…,"host":…,"source":…,"sourcetype":…,"index":…,"event":RAW}`.
///
/// `time` is `AlertTime` in epoch seconds with microseconds, else
/// `LastProcessedTimeUtc`, else `now`. `host` is `ComputerDnsName` and is
/// left out when empty, as is `index` when not configured.
pub fn encode_hec_event(d: &Detection, options: &HecOptions, now: DateTime<Utc>, out: &mut Vec<u8>) {
    let time = d.alert_time().or_else(|| d.last_processed()).filter(|t| t.timestamp() >= 0).unwrap_or(now);
    out.extend_from_slice(format!("{{\"time\":{}.{:06}", time.timestamp(), time.timestamp_subsec_micros()).as_bytes());
    if let Some(host) = d.text("ComputerDnsName") {
        write_member("host", &host, out);
    }
    write_member("source", &options.source, out);
    write_member("sourcetype", &options.sourcetype, out);
    if let Some(index) = &options.index {
        write_member("index", index, out);
    }
    out.extend_from_slice(b",\"event\":");
    out.extend_from_slice(d.raw().trim().as_bytes());
    out.push(b'}');
}

fn write_member(name: &str, value: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn options(index: Option<&str>) -> HecOptions {
        HecOptions { source: "mde-forwarder".into(), sourcetype: "wdatp:alerts".into(), index: index.map(String::from) }
    }

    fn encode(raw: &str, index: Option<&str>) -> Vec<u8> {
        let d = Detection::from_json_text(raw).unwrap();
        let mut out = Vec::new();
        let now = DateTime::parse_from_rfc3339("2024-05-01T00:00:00Z").unwrap().with_timezone(&Utc);
        encode_hec_event(&d, &options(index), now, &mut out);
        out
    }

    #[test]
    fn event_keeps_raw_text_byte_for_byte() {
        let raw = r#"{"FullId":"a\"\\|=","ReportID":123456789012345678901,"AlertTime":"2024-03-01T10:00:00.1234567Z","ComputerDnsName":"ws1.contoso.com","Title":"二"}"#;
        let out = String::from_utf8(encode(raw, None)).unwrap();
        assert!(out.ends_with(&format!(",\"event\":{raw}}}")), "{out}");
        let parsed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["host"], "ws1.contoso.com");
        assert_eq!(parsed["source"], "mde-forwarder");
        assert_eq!(parsed["sourcetype"], "wdatp:alerts");
        assert!(parsed.get("index").is_none());
    }

    #[test]
    fn time_is_alert_time_with_fraction() {
        let out = encode(r#"{"AlertTime":"2024-03-01T10:00:00.1234567Z","LastProcessedTimeUtc":"2024-03-02T00:00:00Z"}"#, None);
        assert!(out.starts_with(b"{\"time\":1709287200.123456,"), "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn time_falls_back_to_last_processed_then_now() {
        let out = encode(r#"{"AlertTime":"","LastProcessedTimeUtc":"2024-03-02T00:00:00Z"}"#, None);
        assert!(out.starts_with(b"{\"time\":1709337600.000000,"), "{}", String::from_utf8_lossy(&out));
        let out = encode(r#"{"AlertTime":"not a time"}"#, None);
        assert!(out.starts_with(b"{\"time\":1714521600.000000,"), "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn index_and_escaped_metadata() {
        let d = Detection::from_json_text(r#"{"ComputerDnsName":"a\"b"}"#).unwrap();
        let mut out = Vec::new();
        encode_hec_event(&d, &options(Some("sec\"urity")), Utc::now(), &mut out);
        let parsed: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(parsed["index"], "sec\"urity");
        assert_eq!(parsed["host"], "a\"b");
    }
}
