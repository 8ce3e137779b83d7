//! Timestamps as the Defender API writes them: ISO 8601 in UTC with up to
//! seven fractional digits (.NET ticks), sometimes fewer, sometimes no `Z`.
//!
//! `chrono` keeps nanoseconds, so a parsed value holds every digit the API
//! sent. Formatting for a query truncates to whole ticks (100 ns) and never
//! rounds up, because a checkpoint rounded up would skip detections.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

/// Parses an API timestamp. A value without an offset is taken as UTC, as the
/// API does for `sinceTimeUtc=2016-09-12T00:00:00.000`.
pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc());
        }
    }
    None
}

/// Formats a time for `sinceTimeUtc` and `untilTimeUtc`: UTC, `Z`, exactly
/// seven fractional digits, truncated (never rounded) to whole ticks.
pub fn format_query(t: DateTime<Utc>) -> String {
    let ticks = t.timestamp_subsec_nanos() / 100;
    format!("{}.{:07}Z", t.format("%Y-%m-%dT%H:%M:%S"), ticks)
}

/// Formats a time with every nanosecond kept, for storing checkpoints.
pub fn format_exact(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeps_seven_fractional_digits() {
        let t = parse("2020-09-30T14:11:44.0779765Z").unwrap();
        assert_eq!(t.timestamp_subsec_nanos(), 77_976_500);
    }

    #[test]
    fn parse_accepts_fewer_digits_and_missing_offset() {
        assert_eq!(parse("2020-09-30T14:09:20.35743Z").unwrap().timestamp_subsec_nanos(), 357_430_000);
        assert_eq!(parse("2020-09-30T14:09:20Z").unwrap().timestamp_subsec_nanos(), 0);
        assert_eq!(parse("2016-09-12T00:00:00.000").unwrap().timestamp(), 1_473_638_400);
        assert!(parse("yesterday").is_none());
        assert!(parse("").is_none());
    }

    #[test]
    fn format_query_truncates_below_a_tick() {
        let t = parse("2020-09-30T14:11:44.999999999Z").unwrap();
        assert_eq!(format_query(t), "2020-09-30T14:11:44.9999999Z");
    }

    #[test]
    fn format_query_round_trips_api_values() {
        for text in ["2020-09-30T14:11:44.0779765Z", "2026-01-01T00:00:00.0000000Z"] {
            assert_eq!(format_query(parse(text).unwrap()), text);
        }
    }

    #[test]
    fn format_exact_round_trips_nanoseconds() {
        let t = parse("2020-09-30T14:11:44.123456789Z").unwrap();
        assert_eq!(parse(&format_exact(t)).unwrap(), t);
    }
}
