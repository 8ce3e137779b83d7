//! mde-forwarder: pulls Microsoft Defender for Endpoint detections from the
//! SIEM REST API and forwards them to syslog, file and HTTP sinks.

/// Writes a line to standard output, like `println!`. When the output is
/// closed, as under `| head`, the command ends with exit code 1 and a
/// message instead of a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }};
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
