//! Standard output of the commands. A closed pipe (EPIPE, as under `| head`)
//! ends the output quietly, as Unix tools do, and the command still exits 0.
//! Any other write error, such as a full disk under `> FILE`, is reported
//! once on standard error and makes the command exit 1.
//!
//! Rust ignores SIGPIPE, so a write to a closed pipe returns EPIPE instead
//! of killing the process. After the first failed write, later writes are
//! skipped, but the command finishes its work: a `state` command that
//! prints a line before its last change still makes that change. `demo`,
//! which runs until stopped, stops when its stdout sink finds the pipe
//! closed (see [`closed_pipe_signal`]).

use std::io::{self, Write as _};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use tokio::sync::watch;

const OPEN: u8 = 0;
const CLOSED_PIPE: u8 = 1;
const FAILED: u8 = 2;

/// The state of standard output: `OPEN`, `CLOSED_PIPE` or `FAILED`.
static STATE: AtomicU8 = AtomicU8::new(OPEN);

/// Sender of the channel that [`closed_pipe_signal`] returns.
static CLOSED_PIPE_SENDER: OnceLock<watch::Sender<bool>> = OnceLock::new();

fn closed_pipe_sender() -> &'static watch::Sender<bool> {
    CLOSED_PIPE_SENDER.get_or_init(|| watch::channel(false).0)
}

/// Returns a channel that turns true once a write to standard output has
/// found the pipe closed.
pub fn closed_pipe_signal() -> watch::Receiver<bool> {
    closed_pipe_sender().subscribe()
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
    if is_closed_pipe(error) {
        let _ = STATE.compare_exchange(OPEN, CLOSED_PIPE, Ordering::Relaxed, Ordering::Relaxed);
        closed_pipe_sender().send_replace(true);
        return;
    }
    if STATE.swap(FAILED, Ordering::Relaxed) != FAILED {
        eprintln!("error: cannot write to standard output: {error}");
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
