//! mde-forwarder: pulls Microsoft Defender for Endpoint detections from the
//! SIEM REST API and forwards them to syslog, file and HTTP sinks.

/// Writes a line to standard output, like `println!`, without a panic when
/// the write fails (see [`output`] for what a closed pipe and other errors do).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))
    };
}

pub mod detection;
pub mod timefmt;
pub mod auth;
pub mod config;
pub mod format;
pub mod json_stream;
pub mod retry;
pub mod sink;
pub mod source;
pub mod store;
pub mod pipeline;
pub mod pull;
pub mod cli;
pub mod daemon;
pub mod probe;
pub mod telemetry;
pub mod demo;
pub mod emulator;
pub mod seen;
pub mod spool;
pub mod redact;
pub mod output;
