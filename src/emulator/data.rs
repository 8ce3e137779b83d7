//! Detections to serve: the embedded samples, moving loaded detections to
//! the present, and synthesizing new ones with fresh ids.

use std::sync::OnceLock;

use chrono::{DateTime, NaiveDateTime, TimeDelta, Utc};
use serde_json::{Map, Value};

use super::state::{base64_standard, Shared, StoredDetection, XorShift};
use crate::timefmt;

/// The fields that hold times; both move together when detections are shifted.
const TIME_FIELDS: [&str; 2] = ["AlertTime", "LastProcessedTimeUtc"];

/// .NET ticks (100 ns) from 0001-01-01 to the Unix epoch. Defender alert ids
/// start with `da` and the ticks of the alert.
const UNIX_EPOCH_TICKS: i64 = 621_355_968_000_000_000;

/// String fields that `generate` shortens, in this order, when a detection is
/// longer than requested.
const SHRINKABLE_FIELDS: [&str; 8] = [
    "CommandLine",
    "Description",
    "InternalIPv6List",
    "InternalIPv4List",
    "LogOnUsers",
    "FilePath",
    "IncidentLinkToMTP",
    "IncidentLinkToWDATP",
];

/// Returns the 46 sample detections embedded from `tests/data/detections.json`.
pub fn sample_detections() -> Vec<Value> {
    samples().to_vec()
}

fn samples() -> &'static [Value] {
    static SAMPLES: OnceLock<Vec<Value>> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        match serde_json::from_str(include_str!("../../tests/data/detections.json")) {
            Ok(samples) => samples,
            Err(error) => {
                // A unit test parses the file, so this means a broken build.
                tracing::error!(%error, "embedded sample detections are not a JSON array of objects");
                Vec::new()
            }
        }
    })
}

/// Moves `AlertTime` and `LastProcessedTimeUtc` of every detection by the
/// same whole number of seconds, so the newest `LastProcessedTimeUtc` lands
/// in the second before `now` (never after it). Values that do not parse
/// stay as they are.
pub(super) fn shift_to_now(detections: &mut [Value], now: DateTime<Utc>) {
    let newest = detections
        .iter()
        .filter_map(|detection| detection.get("LastProcessedTimeUtc")?.as_str())
        .filter_map(timefmt::parse)
        .max();
    let Some(newest) = newest else {
        return;
    };
    let offset = now - newest;
    let mut secs = offset.num_seconds();
    // `num_seconds` truncates toward zero; flooring keeps the newest value
    // at or before `now` when the offset is negative too.
    if TimeDelta::seconds(secs) > offset {
        secs -= 1;
    }

    for detection in detections.iter_mut() {
        for field in TIME_FIELDS {
            let Some(Value::String(text)) = detection.get_mut(field) else {
                continue;
            };
            if let Some(shifted) = shift_text(text, secs) {
                *text = shifted;
            }
        }
    }
}

/// Adds `secs` seconds to a timestamp written as `YYYY-MM-DDTHH:MM:SS`
/// (or with a space for `T`), followed by anything. Only the date and time
/// digits change, so the fraction, the zone suffix and the separator keep
/// their exact text. Returns `None` for text of another shape.
pub(super) fn shift_text(text: &str, secs: i64) -> Option<String> {
    let head = text.get(..19)?;
    let rest = &text[19..];
    let format = match head.as_bytes()[10] {
        b'T' => "%Y-%m-%dT%H:%M:%S",
        b' ' => "%Y-%m-%d %H:%M:%S",
        _ => return None,
    };
    let time = NaiveDateTime::parse_from_str(head, format).ok()?;
    let shifted = time.checked_add_signed(TimeDelta::try_seconds(secs)?)?;
    let new_head = shifted.format(format).to_string();
    // A year outside 1000..=9999 would change the text's length.
    if new_head.len() != 19 {
        return None;
    }
    Some(new_head + rest)
}

/// Adds a detection processed now to the tenant and returns it.
pub(super) fn new_detection(shared: &Shared, tenant_id: &str) -> Value {
    let now = Utc::now();
    let mut state = shared.lock();
    let state = &mut *state;
    let template = {
        let existing = state
            .tenants
            .get(&tenant_id.to_ascii_lowercase())
            .map(|tenant| tenant.detections.as_slice())
            .unwrap_or_default();
        if existing.is_empty() {
            pick_sample(&mut state.rng)
        } else {
            let index = state.rng.below(existing.len() as u64) as usize;
            serde_json::from_str(&existing[index].json.text).unwrap_or_else(|_| pick_sample(&mut state.rng))
        }
    };

    let mut fields = match template {
        Value::Object(fields) => fields,
        _ => Map::new(),
    };
    let text = timefmt::format_query(now);
    refresh_identity(&mut fields, &mut state.rng, now);
    fields.insert("AlertTime".into(), Value::String(text.clone()));
    fields.insert("LastProcessedTimeUtc".into(), Value::String(text));

    let detection = Value::Object(fields);
    state.tenant_mut(tenant_id).detections.push(StoredDetection::new(&detection));
    detection
}

/// Generated detections compressed together ahead of time: about 128 KiB
/// of JSON at 2 KB each. Each run starts without history, so longer runs
/// compress better; a page that cuts a run compresses that run when served.
const COMPRESSED_RUN: usize = 64;

/// Adds `count` synthetic detections of about `approx_bytes` of JSON each,
/// processed at random times in the last hour.
pub(super) fn generate(shared: &Shared, tenant_id: &str, count: usize, approx_bytes: usize) {
    let now = Utc::now();
    let mut state = shared.lock();
    let state = &mut *state;
    let mut stored = Vec::with_capacity(count);
    for _ in 0..count {
        let detection = synthesize(&mut state.rng, now, approx_bytes);
        stored.push(StoredDetection::new(&detection));
    }
    // In the order a query lists them, so that runs of them can be
    // compressed ahead of time and served without compressing them again.
    stored.sort_by_key(|detection| detection.last_processed);
    for run in stored.chunks(COMPRESSED_RUN) {
        super::alerts::compress_run(run.iter().map(|detection| &detection.json));
    }
    state.tenant_mut(tenant_id).detections.extend(stored);
}

fn synthesize(rng: &mut XorShift, now: DateTime<Utc>, approx_bytes: usize) -> Value {
    let mut fields = match pick_sample(rng) {
        Value::Object(fields) => fields,
        _ => Map::new(),
    };
    // Processed within the last hour, alerted up to ten minutes earlier, both
    // on whole ticks as the API writes them.
    let processed = now - ticks(rng.below(3600 * 10_000_000));
    let alerted = processed - ticks(rng.below(600 * 10_000_000));
    refresh_identity(&mut fields, rng, alerted);

    let alert_time = match fields.get("AlertTime").and_then(Value::as_str) {
        Some(template) => format_like(template, alerted),
        None => timefmt::format_query(alerted),
    };
    fields.insert("AlertTime".into(), Value::String(alert_time));
    fields.insert("LastProcessedTimeUtc".into(), Value::String(timefmt::format_query(processed)));

    resize(&mut fields, rng, approx_bytes);
    Value::Object(fields)
}

fn ticks(count: u64) -> TimeDelta {
    TimeDelta::nanoseconds(count as i64 * 100)
}

fn pick_sample(rng: &mut XorShift) -> Value {
    let samples = samples();
    let index = rng.below(samples.len() as u64) as usize;
    samples.get(index).cloned().unwrap_or_else(|| Value::Object(Map::new()))
}

/// Formats `time` with as many fractional digits as `template` has, with `Z`.
fn format_like(template: &str, time: DateTime<Utc>) -> String {
    let digits = template
        .split_once('.')
        .map_or(0, |(_, fraction)| fraction.bytes().take_while(u8::is_ascii_digit).count())
        .min(7);
    let full = timefmt::format_query(time);
    // `format_query` gives `YYYY-MM-DDTHH:MM:SS.fffffffZ`: 19 characters, a
    // dot and seven digits.
    if digits == 0 {
        format!("{}Z", &full[..19])
    } else {
        format!("{}Z", &full[..20 + digits])
    }
}

/// Gives a detection fresh `AlertId`, `IocUniqueId`, `FullId`, `ReportID`
/// and `ExternalId`, and rewrites the old alert id inside links.
fn refresh_identity(fields: &mut Map<String, Value>, rng: &mut XorShift, alert_time: DateTime<Utc>) {
    let old_alert_id = fields.get("AlertId").and_then(Value::as_str).unwrap_or_default().to_string();

    let alert_ticks = UNIX_EPOCH_TICKS + alert_time.timestamp_nanos_opt().unwrap_or(0) / 100;
    let alert_id = format!("da{alert_ticks}_{}", rng.next_u64() as i32);
    let ioc_unique_id = base64_standard(&rng.bytes(32));
    let external_id: String = rng.bytes(20).iter().map(|byte| format!("{byte:02X}")).collect();

    if !old_alert_id.is_empty() {
        for value in fields.values_mut() {
            if let Value::String(text) = value {
                if text.contains(&old_alert_id) {
                    *text = text.replace(&old_alert_id, &alert_id);
                }
            }
        }
    }
    fields.insert("AlertId".into(), Value::String(alert_id.clone()));
    fields.insert("FullId".into(), Value::String(format!("{alert_id}:{ioc_unique_id}")));
    fields.insert("ReportID".into(), Value::from(rng.below(1 << 31)));
    fields.insert("ExternalId".into(), Value::String(external_id));
    fields.insert("IocUniqueId".into(), Value::String(ioc_unique_id));
}

/// Pads or shortens a detection toward `target` bytes of compact JSON.
/// Padding goes into `CommandLine` as extra arguments. Shortening cuts the
/// fields in [`SHRINKABLE_FIELDS`], so a very small target leaves the
/// detection at its minimum size.
fn resize(fields: &mut Map<String, Value>, rng: &mut XorShift, target: usize) {
    let length = |fields: &Map<String, Value>| serde_json::to_string(fields).map_or(0, |json| json.len());

    if length(fields) < target && !matches!(fields.get("CommandLine"), Some(Value::String(_))) {
        fields.insert("CommandLine".into(), Value::String(String::new()));
    }
    let mut current = length(fields);
    if current < target {
        let padding = command_line_padding(rng, target - current);
        if let Some(Value::String(command_line)) = fields.get_mut("CommandLine") {
            command_line.push_str(&padding);
        }
        return;
    }

    for field in SHRINKABLE_FIELDS {
        if current <= target {
            break;
        }
        if let Some(Value::String(text)) = fields.get_mut(field) {
            let keep = text.chars().count().saturating_sub(current - target);
            *text = text.chars().take(keep).collect();
        }
        current = length(fields);
    }
}

/// Returns `length` bytes of command line arguments that need no JSON escaping.
fn command_line_padding(rng: &mut XorShift, length: usize) -> String {
    let mut padding = String::with_capacity(length + 24);
    while padding.len() < length {
        let argument = base64_standard(&rng.bytes(12)).replace(['+', '/', '='], "x");
        padding.push_str(" /arg:");
        padding.push_str(&argument);
    }
    padding.truncate(length);
    padding
}
