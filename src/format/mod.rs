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
//! splits on line breaks sees exactly one event per detection.
//!
//! When a message must fit a UDP datagram (`max_message_bytes`), it is
//! shortened by dropping the longest optional values first. The result never
//! splits a UTF-8 sequence or an escape sequence. `docs/formats.md` lists the
//! field mappings and the shortening order.

mod cef;
mod extension;
mod json;
mod leef;
mod syslog;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use crate::detection::Detection;

pub use cef::{encode_cef, CefOptions};
pub use json::encode_json;
pub use leef::{encode_leef, LeefOptions};
pub use syslog::{syslog_severity, Facility, FacilityError};

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

/// How messages are separated on the wire.
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

/// What [`Encoder::encode`] had to change to write a detection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncodeOutcome {
    /// The message was shortened to fit `max_message_bytes`.
    pub shortened: bool,
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
    /// or invalid. The outcome tells whether the message was shortened to
    /// fit `max_message_bytes`.
    pub fn encode(&self, d: &Detection, now: DateTime<Utc>, out: &mut Vec<u8>) -> EncodeOutcome {
        let message_start = out.len();
        self.header.write(d, now, out);
        let payload_start = out.len();
        let dropped_keys = self.write_payload(d, out, None);

        let mut shortened = false;
        if let Some(max) = self.max_message_bytes {
            let budget = message_budget(max, self.framing);
            if out.len() - message_start > budget {
                out.truncate(payload_start);
                self.write_shortened(d, out, message_start, budget);
                shortened = true;
            }
        }

        self.frame(out, message_start);
        EncodeOutcome { shortened, dropped_keys }
    }

    fn write_payload(
        &self,
        d: &Detection,
        out: &mut Vec<u8>,
        entries: Option<&mut Vec<extension::Entry>>,
    ) -> u32 {
        match self.payload {
            PayloadFormat::Cef => {
                cef::write_header(&self.payload_prefix, d, out);
                cef::write_extension(d, out, entries)
            }
            PayloadFormat::Leef => {
                leef::write_header(&self.payload_prefix, d, out);
                leef::write_attributes(d, out, entries)
            }
            PayloadFormat::Json => {
                encode_json(d, out);
                0
            }
        }
    }

    /// Writes the payload again, this time keeping only what fits `budget`
    /// bytes counted from `message_start`.
    fn write_shortened(&self, d: &Detection, out: &mut Vec<u8>, message_start: usize, budget: usize) {
        let separator = match self.payload {
            PayloadFormat::Cef => cef::SEPARATOR,
            PayloadFormat::Leef => leef::SEPARATOR,
            PayloadFormat::Json => {
                json::write_within(d, out, message_start, budget);
                return;
            }
        };
        let mut entries = Vec::new();
        self.write_payload(d, out, Some(&mut entries));
        // The extension starts where the first entry does, or at the end
        // when the detection produced no pairs at all.
        let extension_start = entries.first().map_or(out.len(), |e| e.start());
        extension::shorten(out, message_start, extension_start, &entries, separator, budget);
    }

    fn frame(&self, out: &mut Vec<u8>, message_start: usize) {
        match self.framing {
            Framing::Newline => out.push(b'\n'),
            Framing::OctetCounting => {
                let length = out.len() - message_start;
                let mut prefix = [0u8; 24];
                let prefix_len = write_decimal(&mut prefix, length);
                out.splice(message_start..message_start, prefix[..prefix_len].iter().copied());
            }
            Framing::None => {}
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

