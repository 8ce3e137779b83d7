//! Standard output of the commands. A closed pipe (EPIPE, as under `| head`)
//! ends the output quietly, as Unix tools do, and the command still exits 0.
//! Any other write error, such as a full disk under `> FILE`, is reported
//! once on standard error and makes the command exit 1.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe returns EPIPE instead
//! of killing the process. After the first failed write, later writes are
//! skipped, but the command finishes its work: a `state` command that
//! prints a line before its last change still makes that change. `demo`,
//! which runs until stopped, stops when a write of its stdout sink fails
//! (see [`failure_signal`]).

/// Escapes backslashes, control characters (tabs and line feeds included),
/// line and paragraph separators and the invisible characters that change
/// text direction. A hostile value thus cannot split a row or a log line,
/// reorder text on a terminal, or pass for another value.
pub fn printable(text: &str) -> String {
    let invisible = |c: char| {
        matches!(c, '\u{00ad}' | '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}')
    };
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\\' || c.is_control() || invisible(c) {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

use std::io::{self, Write as _};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use tokio::sync::watch;

const OPEN: u8 = 0;
const CLOSED_PIPE: u8 = 1;
const FAILED: u8 = 2;

/// The state of standard output: `OPEN`, `CLOSED_PIPE` or `FAILED`.
static STATE: AtomicU8 = AtomicU8::new(OPEN);

/// A failed write to standard output, as [`failure_signal`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The reader closed the pipe (EPIPE).
    ClosedPipe,
    /// Any other write error, such as a full disk, as its message.
    Error(String),
}

/// Sender of the channel that [`failure_signal`] returns.
static FAILURE_SENDER: OnceLock<watch::Sender<Option<Failure>>> = OnceLock::new();

fn failure_sender() -> &'static watch::Sender<Option<Failure>> {
    FAILURE_SENDER.get_or_init(|| watch::channel(None).0)
}

/// Returns a channel that contains the first failed write to standard
/// output, by a command or by a stdout sink, once there is one.
pub fn failure_signal() -> watch::Receiver<Option<Failure>> {
    failure_sender().subscribe()
}

/// Publishes `error` on the channel of [`failure_signal`], unless an
/// earlier failure is there already.
fn publish_failure(error: &io::Error) {
    let failure = if is_closed_pipe(error) { Failure::ClosedPipe } else { Failure::Error(error.to_string()) };
    failure_sender().send_if_modified(|first| {
        if first.is_some() {
            return false;
        }
        *first = Some(failure);
        true
    });
}

/// Writes one line, as the `out!` macro does. Writes nothing once the
/// output is closed or has failed.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    if STATE.load(Ordering::Relaxed) != OPEN {
        return;
    }
    let mut stdout = io::stdout().lock();
    // Standard output is line-buffered, so the newline flushes the line and
    // a write error shows here, not at exit.
    let result = stdout.write_fmt(args).and_then(|()| stdout.write_all(b"\n"));
    if let Err(error) = result {
        record_error(&error);
    }
}

/// Returns whether `error` is a write to a pipe whose reader has closed it.
pub fn is_closed_pipe(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
}

/// Records a failed write to standard output. A closed pipe is recorded
/// quietly, and any other error is printed on standard error once.
pub fn record_error(error: &io::Error) {
    publish_failure(error);
    if is_closed_pipe(error) {
        let _ = STATE.compare_exchange(OPEN, CLOSED_PIPE, Ordering::Relaxed, Ordering::Relaxed);
        return;
    }
    if STATE.swap(FAILED, Ordering::Relaxed) != FAILED {
        eprintln!("error: cannot write to standard output: {error}");
    }
}

/// Records a failed write of a stdout sink, which keeps the batch and
/// retries it. A closed pipe is recorded as [`record_error`] does. Any other
/// error only goes to [`failure_signal`], which stops `demo`. It is not
/// printed, because the sink worker logs it, and it does not set the exit
/// code, because `run` keeps retrying.
pub fn record_sink_error(error: &io::Error) {
    if is_closed_pipe(error) {
        record_error(error);
    } else {
        publish_failure(error);
    }
}

/// Returns whether a write to standard output failed for a reason other
/// than a closed pipe.
///
/// Nothing is left to flush, because every write ends with a newline or a
/// flush. A flush here could even hang: it waits for the lock of standard
/// output, which a write blocked on a full pipe (a stalled `demo`) holds.
pub fn write_failed() -> bool {
    STATE.load(Ordering::Relaxed) == FAILED
}
