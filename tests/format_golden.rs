//! Pins the exact CEF and LEEF output for the sample detections and a set of
//! hostile ones, so that a change to the encoders that alters a single byte
//! fails here.
//!
//! `tests/data/format-golden.txt` contains, for each input, a label line and the
//! message it encodes to. The messages were written by the encoders as they
//! were before the CEF and LEEF writers were rewritten for speed. They were
//! written again when shortening started to put back identifying pairs that
//! fit after a longer pair was dropped, and only those lines changed. To
//! regenerate the file after an intended change of output, run
//! `MDE_WRITE_GOLDEN=1 cargo test --test format_golden` and review the diff.

use std::fmt::Write as _;

use chrono::{TimeZone, Utc};
use mde_forwarder::detection::Detection;
use mde_forwarder::format::{
    encode_cef, encode_leef, CefOptions, Encoder, EncoderOptions, Facility, Framing, HeaderFormat,
    LeefOptions, PayloadFormat,
};
use serde_json::value::RawValue;

const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/format-golden.txt");

/// Input files, each a JSON array of detections.
const INPUTS: [&str; 2] = ["detections.json", "format-edge-cases.json"];

/// Message size limits that make the encoder shorten most inputs: dropping
/// optional pairs, truncating a kept value, and cutting the header.
const LIMITS: [usize; 4] = [700, 400, 160, 60];

fn inputs() -> Vec<(String, Detection)> {
    let mut detections = Vec::new();
    for file in INPUTS {
        let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        let items: Vec<Box<RawValue>> = serde_json::from_str(&text).unwrap();
        for (index, item) in items.iter().enumerate() {
            detections.push((format!("{file}[{index}]"), Detection::from_raw(item).unwrap()));
        }
    }
    detections
}

fn shortening_encoder(payload: PayloadFormat, max_message_bytes: usize) -> Encoder {
    Encoder::new(EncoderOptions {
        payload,
        header: HeaderFormat::Rfc5424,
        framing: Framing::None,
        facility: Facility::LOCAL0,
        hostname: "fwd1".to_owned(),
        app_name: "mde-forwarder".to_owned(),
        cef: CefOptions::default(),
        leef: LeefOptions::default(),
        max_message_bytes: Some(max_message_bytes),
    })
}

/// Encodes every input in every variant, as the golden file lists them.
fn render() -> String {
    let now = Utc.with_ymd_and_hms(2030, 1, 2, 3, 4, 5).unwrap();
    let mut text = String::new();
    for (name, d) in inputs() {
        let mut out = Vec::new();
        let dropped = encode_cef(&d, &CefOptions::default(), &mut out);
        record(&mut text, &format!("{name} cef dropped={dropped}"), &out);

        out.clear();
        let dropped = encode_leef(&d, &LeefOptions::default(), &mut out);
        record(&mut text, &format!("{name} leef dropped={dropped}"), &out);

        for (format, payload) in [("cef", PayloadFormat::Cef), ("leef", PayloadFormat::Leef)] {
            for max in LIMITS {
                out.clear();
                let outcome = shortening_encoder(payload, max).encode(&d, now, &mut out);
                let label = format!(
                    "{name} {format} max={max} shortened={} dropped={}",
                    outcome.shortened, outcome.dropped_keys
                );
                record(&mut text, &label, &out);
            }
        }
    }
    text
}

fn record(text: &mut String, label: &str, message: &[u8]) {
    let message = std::str::from_utf8(message).unwrap();
    assert!(!message.contains(['\r', '\n']), "{label}: line break in {message:?}");
    let _ = writeln!(text, "# {label}\n{message}");
}

#[test]
fn cef_and_leef_match_golden_file() {
    let actual = render();
    if std::env::var_os("MDE_WRITE_GOLDEN").is_some() {
        std::fs::write(GOLDEN, &actual).unwrap();
    }
    let expected = std::fs::read_to_string(GOLDEN).unwrap();

    let mut label = "";
    for (actual_line, expected_line) in actual.lines().zip(expected.lines()) {
        if let Some(rest) = expected_line.strip_prefix("# ") {
            label = rest;
        }
        assert_eq!(actual_line, expected_line, "first difference, in {label}");
    }
    assert_eq!(actual.lines().count(), expected.lines().count(), "number of lines");
}
