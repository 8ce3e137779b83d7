//! Timestamps as the Defender API writes them: ISO 8601 in UTC with up to
//! seven fractional digits (.NET ticks), sometimes fewer, sometimes no `Z`.
//!
//! `chrono` keeps nanoseconds, so a parsed value holds every digit the API
//! sent. Formatting for a query truncates to whole ticks (100 ns) and never
//! rounds up, because a checkpoint rounded up would skip detections.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeDelta, Utc};

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
    // chrono keeps a leap second as 1e9 or more nanoseconds, and `%S`
    // already writes it as second 60.
    let ticks = t.timestamp_subsec_nanos() % 1_000_000_000 / 100;
    format!("{}.{:07}Z", t.format("%Y-%m-%dT%H:%M:%S"), ticks)
}

/// Rounds up to a whole tick (100 ns), for an upper bound that must not
/// exclude a value between two ticks.
pub fn ceil_tick(t: DateTime<Utc>) -> DateTime<Utc> {
    let rest = t.timestamp_subsec_nanos() % 100;
    if rest == 0 {
        t
    } else {
        t + chrono::Duration::nanoseconds(i64::from(100 - rest))
    }
}

/// Formats a time with every nanosecond kept, for storing checkpoints.
pub fn format_exact(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// Formats a checkpoint or a detection time for an operator, as the API
/// writes `LastProcessedTimeUtc`: UTC, `Z`, seven fractional digits. A time
/// between two ticks (a checkpoint capped at the local clock, say) keeps all
/// nine digits, so the text shown always parses back to the stored time.
pub fn format_api_time(t: DateTime<Utc>) -> String {
    if t.timestamp_subsec_nanos() % 100 == 0 {
        format_query(t)
    } else {
        format_exact(t)
    }
}

/// Parses an ISO 8601 duration such as `PT10M`, `P1D` or `P1DT2H30M5.5S`.
///
/// Years count as 365 days and months as 30 days, as .NET's
/// `XmlConvert.ToTimeSpan` does. A fraction is allowed on any component.
/// Negative durations and empty ones (`P`, `PT`) are rejected.
pub fn parse_iso_duration(text: &str) -> Option<TimeDelta> {
    const SECOND: i128 = 1_000_000_000;
    const DAY: i128 = 86_400 * SECOND;
    const DATE_UNITS: [(char, i128); 4] = [('Y', 365 * DAY), ('M', 30 * DAY), ('W', 7 * DAY), ('D', DAY)];
    const TIME_UNITS: [(char, i128); 3] = [('H', 3600 * SECOND), ('M', 60 * SECOND), ('S', SECOND)];

    let upper = text.trim().to_ascii_uppercase();
    let rest = upper.strip_prefix('P')?;
    let (date_part, time_part) = match rest.split_once('T') {
        Some((date, time)) if !time.is_empty() => (date, Some(time)),
        Some(_) => return None,
        None => (rest, None),
    };
    if date_part.is_empty() && time_part.is_none() {
        return None;
    }

    let mut total = sum_components(date_part, &DATE_UNITS)?;
    if let Some(time_part) = time_part {
        total += sum_components(time_part, &TIME_UNITS)?;
    }
    i64::try_from(total).ok().map(TimeDelta::nanoseconds)
}

/// Sums `<number><designator>` components in nanoseconds. Designators must
/// follow the order of `units`, each at most once.
fn sum_components(mut text: &str, units: &[(char, i128)]) -> Option<i128> {
    let mut total: i128 = 0;
    let mut next_unit = 0;
    while !text.is_empty() {
        let number_len = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ','))?;
        let (number, after) = text.split_at(number_len);
        let designator = after.chars().next()?;
        let offset = units[next_unit..].iter().position(|(unit, _)| *unit == designator)?;
        let unit_nanos = units[next_unit + offset].1;
        next_unit += offset + 1;
        total = total.checked_add(scale_decimal(number, unit_nanos)?)?;
        text = &after[designator.len_utf8()..];
    }
    Some(total)
}

/// Multiplies a decimal such as `5.5` by `unit`, exactly to the nanosecond.
fn scale_decimal(number: &str, unit: i128) -> Option<i128> {
    let (whole, fraction) = match number.split_once(['.', ',']) {
        Some((whole, fraction)) => (whole, fraction),
        None => (number, ""),
    };
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i128 = whole.parse().ok()?;
    let mut value = whole.checked_mul(unit)?;
    // Each digit adds its share of `unit`; once that share is below one
    // nanosecond, further digits add nothing.
    let mut place = unit;
    for digit in fraction.bytes().take(18) {
        place /= 10;
        value += i128::from(digit - b'0') * place;
    }
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leap_second_keeps_seven_digits() {
        let leap = parse("2016-12-31T23:59:60.5000000Z").expect("chrono parses a leap second");
        assert_eq!(format_query(leap), "2016-12-31T23:59:60.5000000Z");
        assert_eq!(format_api_time(leap), "2016-12-31T23:59:60.5000000Z");
        assert_eq!(parse(&format_api_time(leap)), Some(leap), "the text parses back to the same time");
        let between_ticks = leap + chrono::Duration::nanoseconds(1);
        assert_eq!(parse(&format_api_time(between_ticks)), Some(between_ticks));
    }

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
    fn ceil_tick_rounds_up_only_between_ticks() {
        let between = parse("2026-01-01T00:00:00.12345675Z").unwrap();
        assert_eq!(format_query(ceil_tick(between)), "2026-01-01T00:00:00.1234568Z");
        let exact = parse("2026-01-01T00:00:00.1234567Z").unwrap();
        assert_eq!(ceil_tick(exact), exact);
    }

    #[test]
    fn format_api_time_has_seven_digits_on_ticks() {
        for text in ["2026-12-01T00:00:00.0000000Z", "2020-09-30T14:11:44.0779765Z", "2020-09-30T14:11:44.1000000Z"] {
            assert_eq!(format_api_time(parse(text).unwrap()), text);
        }
    }

    #[test]
    fn format_api_time_keeps_nanoseconds_between_ticks() {
        let t = parse("2020-09-30T14:11:44.123456789Z").unwrap();
        assert_eq!(format_api_time(t), "2020-09-30T14:11:44.123456789Z");
        assert_eq!(parse(&format_api_time(t)).unwrap(), t);
    }

    #[test]
    fn format_exact_round_trips_nanoseconds() {
        let t = parse("2020-09-30T14:11:44.123456789Z").unwrap();
        assert_eq!(parse(&format_exact(t)).unwrap(), t);
    }
}
