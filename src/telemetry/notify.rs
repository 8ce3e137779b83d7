//! The systemd notify protocol (sd_notify(3)): newline-separated `KEY=value`
//! assignments sent as one datagram to the unix socket named by
//! `NOTIFY_SOCKET`. A name starting with `@` is in the abstract namespace.
//!
//! Outside systemd `NOTIFY_SOCKET` is unset and every send does nothing.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

/// A connection to the service manager's notify socket, if there is one.
pub struct Notifier {
    target: Option<(UnixDatagram, Target)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`; an invalid value is logged and ignored.
    pub fn from_env() -> Self {
        let Some(value) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self { target: None };
        };
        let text = value.to_string_lossy().into_owned();
        let target = if let Some(name) = text.strip_prefix('@') {
            Target::Abstract(name.as_bytes().to_vec())
        } else if text.starts_with('/') {
            Target::Path(PathBuf::from(&value))
        } else {
            tracing::warn!(notify_socket = %text, "NOTIFY_SOCKET is neither an absolute path nor an @abstract name; not notifying systemd");
            return Self { target: None };
        };
        match UnixDatagram::unbound() {
            Ok(socket) => Self { target: Some((socket, target)) },
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a socket for NOTIFY_SOCKET; not notifying systemd");
                Self { target: None }
            }
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `state`, for example `READY=1` or `STATUS=...`. Failures are
    /// logged: the service keeps running without the notification.
    pub fn send(&self, state: &str) {
        let Some((socket, target)) = &self.target else { return };
        if let Err(e) = send_to(socket, target, state.as_bytes()) {
            if let Some(suppressed) = super::should_log(&format!("sd_notify {e}")) {
                tracing::warn!(error = %e, suppressed, "cannot notify systemd");
            }
        }
    }
}

fn send_to(socket: &UnixDatagram, target: &Target, message: &[u8]) -> io::Result<usize> {
    match target {
        Target::Path(path) => socket.send_to(message, path),
        Target::Abstract(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message, &addr)
        }
    }
}

/// Returns the watchdog timeout from `WATCHDOG_USEC`, when it is set for this process
/// (`WATCHDOG_PID` unset or equal to our process id).
pub fn watchdog_timeout() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Turns text into one line for `STATUS=`, which ends at a line feed.
pub fn status_text(text: &str) -> String {
    text.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("mde-forwarder-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier { target: Some((UnixDatagram::unbound().unwrap(), Target::Abstract(name.into_bytes()))) };

        notifier.send("READY=1\nSTATUS=started");

        let mut buf = [0u8; 64];
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=started");
    }

    #[test]
    fn status_text_is_one_line() {
        assert_eq!(status_text("a\nb\r\nc"), "a b  c");
    }
}
