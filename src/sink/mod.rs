//! Transports: they move already-encoded bytes and know nothing of formats.
//!
//! A batch is a buffer of framed messages plus the end offset of each message.
//! `send` returns only when the batch is acknowledged in the transport's own
//! terms: TCP or TLS bytes written and acknowledged by the peer's TCP stack, a
//! file written and fsync'ed, stdout flushed, UDP datagrams handed to the
//! kernel, an HTTP 2xx, or a Splunk indexer acknowledgement when enabled.
//! A TCP or TLS batch is settled only once the receiver also confirms
//! reading it (see [`Transport::unconfirmed`]).
//!
//! An `Err` means "send the whole batch again", except
//! [`SinkError::PayloadTooLarge`], after which the worker sends the batch in
//! smaller parts. A receiver that rejects
//! messages for good (their content, not the connection, is at fault) is
//! reported as a [`SendOutcome`] instead, so the worker can dead-letter them.

mod file;
mod hec;
mod http;
mod redact;
mod stream;
pub mod tls;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UdpSocket;

pub use file::FileTransport;
pub use hec::{HecSettings, HecTransport};
pub use http::{HttpSettings, HttpTransport};
pub use http::build_client as build_http_client;
pub use http::{proxy_for, sink_proxy};
pub use redact::{Redactor, REDACTED};
pub use stream::{Finish, StreamTransport, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("connect to {address} failed: {source}")]
    Connect { address: String, source: io::Error },
    #[error("connect to {address} timed out after {secs} s")]
    ConnectTimeout { address: String, secs: u64 },
    #[error("send to {address} failed: {source}")]
    Send { address: String, source: io::Error },
    #[error("send to {address} timed out after {secs} s (the receiver is not reading)")]
    SendTimeout { address: String, secs: u64 },
    #[error("{address} closed the connection before acknowledging the batch; it is sent again")]
    PeerClosed { address: String },
    /// A receiver that did not confirm the last batches by closing its side.
    #[error("{address} {behaviour}, so it did not confirm reading the last batches, and they are sent again. If the receiver keeps connections open or resets them by design, set confirm = \"tcp-ack\" for this sink: it then counts a batch as delivered once the receiver's TCP stack acknowledged it")]
    CloseUnconfirmed { address: String, behaviour: &'static str },
    /// A connection lost with batches the receiver had not confirmed reading.
    #[error("{address} closed or reset the connection with {batches} batches it may not have read; they are sent again from the outbox, so it may get some twice")]
    LostUnread { address: String, batches: usize },
    /// A receiver that closed a new connection before its first batch, or
    /// soon after it without reading.
    #[error("{address} accepted the connection and closed it without reading; the batch is sent on a new connection. A receiver does this at its connection limit (syslog-ng max-connections, rsyslog MaxSessions) or when it rejects this host")]
    ClosedUnread { address: String },
    #[error("write to {path} failed: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("write to standard output failed: {0}")]
    Stdout(io::Error),
    #[error("TLS handshake with {address} failed: {source}")]
    Tls { address: String, source: io::Error },
    #[error("{address} requires a client certificate (mutual TLS) and rejected the session without one; set tls_cert_file and tls_key_file of this sink")]
    ClientCertificateRequired { address: String },
    #[error("{address} rejected this sink's client certificate{alert}; check that the receiver trusts the CA that signed tls_cert_file, that the certificate has not expired, and that it is meant for client authentication")]
    ClientCertificateRejected { address: String, alert: String },
    #[error("request to {url} failed: {}", crate::redact::error_chain(source))]
    Http { url: String, source: reqwest::Error },
    #[error("request to {url} through proxy {proxy} failed: {}{}", crate::redact::error_chain(source), proxy_advice(source, "receiver", "receiver"))]
    HttpProxy { url: String, proxy: String, source: reqwest::Error },
    #[error("{url} returned HTTP {status}: {body}")]
    HttpStatus { url: String, status: u16, body: String, retry_after: Option<Duration> },
    #[error("Splunk HEC at {url} rejected the token (HTTP {status}: {body}); check the sink's token, token_file or token_env")]
    InvalidToken { url: String, status: u16, body: String },
    /// A redirect, which the sink does not follow.
    #[error("{url} redirected the request (HTTP {status}) to {location}; a sink does not follow redirects, so set its url to the address that takes the request. No detection is dead-lettered for it; the batch stays queued and is sent again")]
    Redirected { url: String, status: u16, location: String },
    /// A status that rejects the request, not the detections in it, so
    /// nothing is dead-lettered for it.
    #[error("{url} returned HTTP {status}: {body}; {advice}. No detection is dead-lettered for it; the batch stays queued and is sent again")]
    RequestRejected { url: String, status: u16, body: String, advice: &'static str },
    #[error("Splunk HEC at {url} returned an unreadable response (HTTP {status}): {body}")]
    BadResponse { url: String, status: u16, body: String },
    #[error("{url} rejected a request of {events} detections ({bytes} bytes) as too large (HTTP 413: {body}); the batch is sent again in smaller parts")]
    PayloadTooLarge { url: String, events: usize, bytes: usize, body: String },
    /// A HEC rejection whose code blames the sink's config, its token or
    /// the receiver, not an event, so nothing is dead-lettered for it.
    #[error("Splunk HEC at {url} returned HTTP {status} with code {code} \"{text}\": {advice}. No detection is dead-lettered for it; the batch stays queued and is sent again")]
    HecStatus { url: String, status: u16, code: u64, text: String, advice: &'static str, needs_operator: bool },
    #[error("Splunk HEC at {url} did not acknowledge ackId {ack_id} within {secs} s; the batch is sent again")]
    AckTimeout { url: String, ack_id: u64, secs: u64 },
}

impl SinkError {
    /// Wraps a failed HTTP request. The URL is shown without its user,
    /// password and query (see [`crate::redact::url`]) and removed from
    /// reqwest's own message, which would repeat it whole. `proxy` is the
    /// proxy that the request went through, already redacted. The message
    /// names it, so that a proxy that is down is not taken for a receiver
    /// that is down.
    pub fn http(url: &str, proxy: Option<&str>, source: reqwest::Error) -> Self {
        let url = crate::redact::url(url);
        let source = source.without_url();
        match proxy {
            Some(proxy) => SinkError::HttpProxy { url, proxy: proxy.to_string(), source },
            None => SinkError::Http { url, source },
        }
    }

    /// The wait the receiver asked for (`Retry-After`), if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SinkError::HttpStatus { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// True when the receiver rejected the request as too large (HTTP 413),
    /// so the batch must be sent in smaller parts, not again whole.
    pub fn payload_too_large(&self) -> bool {
        matches!(self, SinkError::PayloadTooLarge { .. })
    }

    /// True when retrying cannot help until an operator changes something.
    pub fn needs_operator(&self) -> bool {
        match self {
            SinkError::InvalidToken { .. }
            | SinkError::RequestRejected { .. }
            | SinkError::Redirected { .. }
            | SinkError::ClosedUnread { .. }
            | SinkError::CloseUnconfirmed { .. } => true,
            SinkError::HecStatus { needs_operator, .. } => *needs_operator,
            _ => false,
        }
    }
}

/// Returns the advice for a failed request through a proxy. A connect error
/// there mostly means that the proxy refused or did not accept the
/// connection in time, or rejected the tunnel to `peer`. The advice names
/// `allowed` as what the proxy must let through.
// NOTE: a failed TLS handshake with the peer inside the tunnel is a
// connect error too. Only the cause in the message distinguishes it.
pub(crate) fn proxy_advice(source: &reqwest::Error, peer: &str, allowed: &str) -> String {
    if source.is_connect() {
        format!("; the proxy refused the connection, timed out, or rejected the tunnel to the {peer}: check that it is running, its credentials, and that it allows the {allowed}")
    } else {
        String::new()
    }
}

/// The result of a send that reached the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Every message is acknowledged.
    Delivered,
    /// Messages `0..delivered` are acknowledged, message `delivered` is
    /// rejected for good with `reason`, and the ones after it must be sent again.
    Rejected { delivered: usize, reason: String },
    /// Every message of the batch is rejected for good with `reason`.
    AllRejected { reason: String },
}

/// A batch of framed messages: its bytes contain them back to back and
/// `ends[i]` is the offset just past message `i`.
///
/// The bytes sit behind an `Arc`, so a transport that writes on another
/// thread (the file sink) or hands the body to an HTTP client (HEC) shares
/// them instead of copying the batch.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Arc<Vec<u8>>,
    pub ends: Vec<usize>,
}

/// The bytes of a [`Batch`], shared without copying.
#[derive(Debug, Clone)]
pub struct SharedBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for SharedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Batch {
    pub fn clear(&mut self) {
        match Arc::get_mut(&mut self.bytes) {
            Some(bytes) => bytes.clear(),
            // An abandoned send still writes the old bytes: leave them to it
            // instead of copying them only to clear the copy.
            None => self.bytes = Arc::default(),
        }
        self.ends.clear();
    }

    /// Returns all messages, back to back.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Returns the buffer to append the next message to. It is copied first only
    /// while an abandoned send still writes the previous contents.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        Arc::make_mut(&mut self.bytes)
    }

    pub fn shared_bytes(&self) -> SharedBytes {
        SharedBytes(Arc::clone(&self.bytes))
    }

    /// Appends one message, for callers that have it whole.
    pub fn push_message(&mut self, message: &[u8]) {
        self.buffer().extend_from_slice(message);
        self.end_message();
    }

    /// Marks the end of the message just appended to the buffer.
    pub fn end_message(&mut self) {
        self.ends.push(self.bytes.len());
    }

    pub fn messages(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        starts.zip(self.ends.iter().copied()).map(|(start, end)| &self.bytes[start..end])
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Removes the last message.
    pub fn pop_message(&mut self) {
        self.ends.pop();
        let end = self.ends.last().copied().unwrap_or(0);
        self.buffer().truncate(end);
    }
}

pub enum Transport {
    Stream(StreamTransport),
    Udp(UdpTransport),
    File(FileTransport),
    Stdout,
    Http(HttpTransport),
    Hec(HecTransport),
}

impl Transport {
    pub async fn send(&mut self, batch: &Batch) -> Result<SendOutcome, SinkError> {
        match self {
            Transport::Stream(t) => t.send(batch).await.map(|()| SendOutcome::Delivered),
            Transport::Udp(t) => t.send(batch).await.map(|()| SendOutcome::Delivered),
            Transport::File(t) => t.send(batch).await.map(|()| SendOutcome::Delivered),
            Transport::Stdout => {
                let mut out = tokio::io::stdout();
                let written = match out.write_all(batch.bytes()).await {
                    Ok(()) => out.flush().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = written {
                    // The batch stays queued. Only `demo` stops on a failed write.
                    crate::output::record_sink_error(&e);
                    return Err(SinkError::Stdout(e));
                }
                Ok(SendOutcome::Delivered)
            }
            Transport::Http(t) => t.send(batch).await,
            Transport::Hec(t) => t.send(batch).await,
        }
    }

    /// Drops the connection (or open file) after a send was abandoned part
    /// way, so the next send starts on a fresh one. An HTTP request that is
    /// dropped closes its own connection, so HTTP and HEC keep their client.
    pub fn close_connection(&mut self) {
        match self {
            Transport::Stream(t) => t.close(),
            Transport::Udp(t) => t.socket = None,
            Transport::File(t) => t.close(),
            Transport::Stdout | Transport::Http(_) | Transport::Hec(_) => {}
        }
    }

    /// Completes when a TCP or TLS connection has something to read (a
    /// close, a reset or data); never for other transports.
    pub async fn readable(&self) {
        match self {
            Transport::Stream(t) => t.readable().await,
            _ => std::future::pending().await,
        }
    }

    /// Looks at a TCP or TLS connection that became readable; true when
    /// batches it delivered were lost with it and wait to be sent again.
    pub async fn check_connection(&mut self) -> bool {
        match self {
            Transport::Stream(t) => t.check_connection().await,
            _ => false,
        }
    }

    /// Opens a TCP or TLS connection ahead of the first batch.
    pub async fn warm_up(&mut self) {
        if let Transport::Stream(t) = self {
            t.warm_up().await;
        }
    }

    /// Returns how many of the newest delivered batches the receiver has
    /// not confirmed reading: only TCP and TLS have such batches (see
    /// [`StreamTransport`]). The older ones are confirmed.
    pub fn unconfirmed(&mut self) -> usize {
        match self {
            Transport::Stream(t) => t.unconfirmed(),
            _ => 0,
        }
    }

    /// Returns, and resets, how many delivered batches were lost with a TCP
    /// or TLS connection before the receiver confirmed reading them.
    pub fn take_lost(&mut self) -> usize {
        match self {
            Transport::Stream(t) => t.take_lost(),
            _ => 0,
        }
    }

    /// True when delivered batches were lost with a connection (see
    /// [`Transport::take_lost`]).
    pub fn lost_pending(&self) -> bool {
        matches!(self, Transport::Stream(t) if t.lost_pending())
    }

    /// Closes a TCP or TLS connection so that the receiver confirms
    /// reading the unconfirmed batches (see [`StreamTransport::finish`]).
    pub async fn finish(&mut self) -> Finish {
        match self {
            Transport::Stream(t) => t.finish().await,
            _ => Finish::Read,
        }
    }

    /// True while a pause may close a TCP or TLS connection to have the
    /// last batches confirmed.
    pub fn confirms_by_close(&self) -> bool {
        match self {
            Transport::Stream(t) => t.confirms_by_close(),
            _ => true,
        }
    }

    /// The largest batch in bytes the transport sends in one request, if limited.
    pub fn max_batch_bytes(&self) -> Option<usize> {
        match self {
            Transport::Http(t) => Some(t.max_batch_bytes()),
            Transport::Hec(t) => Some(t.max_batch_bytes()),
            _ => None,
        }
    }
}

pub struct UdpTransport {
    address: String,
    socket: Option<UdpSocket>,
}

impl UdpTransport {
    pub fn new(address: String) -> Self {
        Self { address, socket: None }
    }

    async fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let address = self.address.clone();
        if self.socket.is_none() {
            let target = tokio::net::lookup_host(&address)
                .await
                .map_err(|source| SinkError::Connect { address: address.clone(), source })?
                .next()
                .ok_or_else(|| SinkError::Connect {
                    address: address.clone(),
                    source: io::Error::new(io::ErrorKind::NotFound, "no address found"),
                })?;
            let bind = if target.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" };
            let socket = UdpSocket::bind(bind).await.map_err(|source| SinkError::Connect { address: address.clone(), source })?;
            socket.connect(target).await.map_err(|source| SinkError::Connect { address: address.clone(), source })?;
            self.socket = Some(socket);
        }
        let Some(socket) = &self.socket else { return Ok(()) };
        for message in batch.messages() {
            if let Err(source) = socket.send(message).await {
                self.socket = None;
                return Err(SinkError::Send { address, source });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_refill_leaves_shared_bytes_intact() {
        let mut batch = Batch::default();
        batch.push_message(b"first\n");
        let in_flight = batch.shared_bytes();

        batch.clear();
        batch.push_message(b"second\n");

        assert_eq!(in_flight.as_ref(), b"first\n", "an abandoned send still writes the old batch");
        assert_eq!(batch.bytes(), b"second\n");
        assert_eq!(batch.messages().collect::<Vec<_>>(), [b"second\n".as_slice()]);
    }

    #[test]
    fn batch_pop_message_truncates_bytes() {
        let mut batch = Batch::default();
        batch.push_message(b"a\n");
        batch.push_message(b"bb\n");

        batch.pop_message();

        assert_eq!(batch.bytes(), b"a\n");
        assert_eq!(batch.len(), 1);
    }
}
