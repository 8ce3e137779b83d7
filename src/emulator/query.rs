//! Query parameters of `GET /api/alerts`: parsing, defaults and matching.
//!
//! Parameter names match case-insensitively, as ASP.NET model binding does.
//! For a parameter taking one value, the first occurrence counts, and an empty
//! value counts as absent.

use chrono::{DateTime, TimeDelta, Utc};

use super::state::StoredDetection;
use crate::timefmt::{self, parse_iso_duration};

/// The window when the request gives no time parameter, as the API documents.
const DEFAULT_WINDOW: TimeDelta = TimeDelta::hours(2);

#[derive(Debug, Clone, PartialEq)]
pub(super) struct AlertQuery {
    /// Inclusive lower bound on `LastProcessedTimeUtc`.
    pub since: DateTime<Utc>,
    /// Inclusive upper bound on `LastProcessedTimeUtc`.
    pub until: DateTime<Utc>,
    /// Return only the most recent this many detections of the window.
    pub limit: Option<usize>,
    pub machine_groups: Vec<String>,
    pub device_tags: Vec<String>,
    pub cloud_tags: Vec<String>,
}

/// Parses the query parameters. The error is a message for a 400 response.
pub(super) fn parse(pairs: &[(String, String)], now: DateTime<Utc>) -> Result<AlertQuery, String> {
    let since = first(pairs, "sinceTimeUtc").map(|text| parse_time("sinceTimeUtc", text)).transpose()?;
    let until = first(pairs, "untilTimeUtc").map(|text| parse_time("untilTimeUtc", text)).transpose()?;
    let ago = first(pairs, "ago")
        .map(|text| {
            parse_iso_duration(text).ok_or_else(|| {
                format!(
                    "Invalid value '{text}' for parameter ago: expected an ISO 8601 duration such as PT10M or P1DT2H."
                )
            })
        })
        .transpose()?;
    let limit = first(pairs, "limit").map(parse_limit).transpose()?;

    // NOTE: the API documents `ago` alone and `sinceTimeUtc`/`untilTimeUtc`
    // without `ago`. Here `ago` overrides both bounds, and `untilTimeUtc`
    // without `sinceTimeUtc` keeps the default start of two hours ago.
    let (since, until) = match ago {
        Some(ago) => (now - ago, now),
        None => (since.unwrap_or(now - DEFAULT_WINDOW), until.unwrap_or(now)),
    };

    Ok(AlertQuery {
        since,
        until,
        limit,
        machine_groups: all(pairs, "machinegroups"),
        device_tags: all(pairs, "DeviceCreatedMachineTags"),
        cloud_tags: all(pairs, "CloudCreatedMachineTags"),
    })
}

fn first<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

fn all(pairs: &[(String, String)], name: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(key, _)| key.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.trim().to_string())
        .filter(|value| !value.is_empty())
        .collect()
}

fn parse_time(name: &str, text: &str) -> Result<DateTime<Utc>, String> {
    timefmt::parse(text).ok_or_else(|| {
        format!("Invalid value '{text}' for parameter {name}: expected a UTC time such as 2016-09-12T00:00:00.000Z.")
    })
}

/// Parses `limit` as the API's 32-bit integer; negative values are rejected.
fn parse_limit(text: &str) -> Result<usize, String> {
    match text.parse::<i32>() {
        Ok(limit) if limit >= 0 => Ok(limit as usize),
        _ => {
            Err(format!("Invalid value '{text}' for parameter limit: expected a whole number from 0 to {}.", i32::MAX))
        }
    }
}

impl AlertQuery {
    pub(super) fn matches(&self, detection: &StoredDetection) -> bool {
        let Some(time) = detection.last_processed else {
            return false;
        };
        if time < self.since || time > self.until {
            return false;
        }
        if !self.machine_groups.is_empty()
            && !self.machine_groups.iter().any(|group| group.eq_ignore_ascii_case(&detection.machine_group))
        {
            return false;
        }
        tags_match(&self.device_tags, &detection.device_tags) && tags_match(&self.cloud_tags, &detection.cloud_tags)
    }
}

/// True when no tag is requested or the comma-separated `list` contains one
/// of the requested tags, ignoring case.
fn tags_match(requested: &[String], list: &str) -> bool {
    requested.is_empty()
        || list.split(',').map(str::trim).any(|tag| requested.iter().any(|wanted| wanted.eq_ignore_ascii_case(tag)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_duration_accepts_documented_forms() {
        let cases = [
            ("PT10M", TimeDelta::minutes(10)),
            ("P1D", TimeDelta::days(1)),
            ("P1DT2H30M5.5S", TimeDelta::milliseconds(((24 + 2) * 3600 + 30 * 60 + 5) * 1000 + 500)),
            ("PT0.0000001S", TimeDelta::nanoseconds(100)),
            ("P2W", TimeDelta::days(14)),
            ("P1Y", TimeDelta::days(365)),
            ("P1M", TimeDelta::days(30)),
            ("PT1M", TimeDelta::minutes(1)),
            ("pt90s", TimeDelta::seconds(90)),
            ("PT0S", TimeDelta::zero()),
            ("PT1,5H", TimeDelta::minutes(90)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_iso_duration(text), Some(expected), "{text}");
        }
    }

    #[test]
    fn iso_duration_rejects_malformed_text() {
        for text in [
            "", "P", "PT", "10M", "-PT10M", "PT10", "PTM", "P1H", "PT1D", "PT1S2M", "PT1M1M", "P1DT", "PT.5S",
            "PT1.2.3S", "PT1MX",
        ] {
            assert_eq!(parse_iso_duration(text), None, "{text}");
        }
    }

    #[test]
    fn parse_defaults_to_last_two_hours() {
        let now = Utc::now();
        let query = parse(&[], now).unwrap();
        assert_eq!(query.since, now - TimeDelta::hours(2));
        assert_eq!(query.until, now);
        assert_eq!(query.limit, None);
    }

    #[test]
    fn parse_treats_empty_values_as_absent() {
        let now = Utc::now();
        let pairs = vec![("sinceTimeUtc".to_string(), String::new()), ("limit".to_string(), " ".to_string())];
        let query = parse(&pairs, now).unwrap();
        assert_eq!(query.since, now - TimeDelta::hours(2));
        assert_eq!(query.limit, None);
    }

    #[test]
    fn limit_rejects_negative_and_overflowing_values() {
        assert!(parse_limit("-1").is_err());
        assert!(parse_limit("2147483648").is_err());
        assert!(parse_limit("ten").is_err());
        assert_eq!(parse_limit("2147483647"), Ok(2_147_483_647));
    }

    #[test]
    fn tags_match_trims_and_ignores_case() {
        assert!(tags_match(&["VIP".to_string()], "finance, vip"));
        assert!(!tags_match(&["vi".to_string()], "finance,vip"));
        assert!(tags_match(&[], ""));
        assert!(!tags_match(&["pci".to_string()], ""));
    }
}
