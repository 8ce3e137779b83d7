//! Syslog over TCP or TLS: one long-lived connection, reopened on failure.
//!
//! Syslog has no application acknowledgement, so a send succeeds when the
//! receiver's TCP stack acknowledged every byte of the batch and did not
//! reset the connection right after. With TLS the writer is flushed first,
//! then the same checks run on the socket under it. The batch is then
//! unconfirmed until the receiver shows that it read it (see
//! [`StreamTransport`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::tls::SinkCertificate;
use super::{Batch, SinkError};

/// What TLS needs to open a session: settings and the name to verify.
pub struct TlsSettings {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
    /// The sink's client certificate, which counts the receiver's requests for it.
    certificate: Option<Arc<SinkCertificate>>,
}

impl TlsSettings {
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> Self {
        Self { connector: TlsConnector::from(config), server_name, certificate: None }
    }

    /// Makes the sink wait for the receiver's verdict on the client
    /// certificate, or its absence, when the receiver requested one (see
    /// [`SinkCertificate`]).
    pub fn watching(self, certificate: Arc<SinkCertificate>) -> Self {
        Self { certificate: Some(certificate), ..self }
    }
}

/// How long a sink waits, after a TLS 1.3 handshake in which the receiver
/// requested a client certificate, for the receiver to reject the session
/// before it writes. A receiver that requires a certificate the sink does
/// not have, or does not trust the one it sent, rejects the session right
/// after the handshake. One that accepts sends nothing, so each of its
/// sessions starts this much later.
/// NOTE: a receiver that rejects later than this is not detected.
const CLIENT_CERTIFICATE_VERDICT: Duration = Duration::from_secs(1);

/// The age a new connection must reach, without a close or reset, before
/// the sink writes its first batch on it. A receiver at its connection limit,
/// or one that rejects the sender's address, accepts the connection and
/// closes it a moment later, reading nothing. A batch written at once would
/// be acknowledged by TCP and then discarded, one batch per connection. The
/// worker opens its connection when it starts (see
/// [`StreamTransport::warm_up`]), so the first batch usually finds the
/// connection old enough already.
/// NOTE: a receiver that closes a new connection later than this is
/// detected by the close or reset after the batch, which is sent again
/// (see [`StreamTransport`]).
const NEW_CONNECTION_SETTLE: Duration = Duration::from_millis(50);

/// The unconfirmed bytes on a connection after which the sink closes it,
/// before the next batch, so that the receiver confirms reading them (see
/// [`StreamTransport`]). A crash sends at most about this much again.
pub const CONFIRM_BYTES: usize = 8 << 20;

/// The age of the oldest unconfirmed batch on a connection after which the
/// sink closes it before the next batch, as for [`CONFIRM_BYTES`].
pub const CONFIRM_AGE: Duration = Duration::from_secs(2);

/// The sink's closes in a row that the receiver met with a reset, after
/// which the next send fails with advice first (see [`StreamTransport::finish`]).
const RESETS_ON_CLOSE_GIVE_UP: u32 = 3;

/// How long the first batch on a connection that follows one the receiver
/// closed without reading waits, after TCP acknowledged it, for a close or
/// reset before it counts. A receiver that accepts connections and closes
/// each unread some time later would otherwise get batches on every
/// connection that all have to be sent again.
/// NOTE: a receiver that waits longer than this before it closes gets
/// them all the same, and they go again after its close, because the
/// worker keeps them queued until the receiver confirms reading them.
const UNREAD_CLOSE_SETTLE: Duration = Duration::from_secs(1);

/// The age below which a connection lost with data unread makes the next
/// one wait [`UNREAD_CLOSE_SETTLE`].
const YOUNG_CONNECTION: Duration = Duration::from_secs(10);

/// The state of the connection as the sink finds it before it writes.
#[derive(Debug, PartialEq)]
enum PeerState {
    Open,
    /// The receiver closed the connection (FIN, or TLS close_notify). It
    /// may still reset it later, with data unread.
    Closed,
    /// The receiver reset the connection, possibly with data unread.
    Reset,
}

/// The receiver's response to the sink's close (see
/// [`StreamTransport::finish`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Finish {
    /// It read everything and closed its side: every batch is confirmed.
    Read,
    /// It reset the connection, or had closed it before: the unconfirmed
    /// batches count as lost (see [`StreamTransport::take_lost`]).
    Lost,
    /// It did not close its side in time: the unconfirmed batches count as
    /// lost, and the next send fails first (see [`StreamTransport::finish`]).
    NoAnswer,
}

enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection {
    fn socket(&self) -> &TcpStream {
        match self {
            Connection::Plain(stream) => stream,
            Connection::Tls(stream) => stream.get_ref().0,
        }
    }

    async fn write_and_flush(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Connection::Plain(stream) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
            Connection::Tls(stream) => {
                stream.write_all(bytes).await?;
                stream.flush().await
            }
        }
    }

    /// Reads (and discards) whatever the peer sent, and returns whether it
    /// closed or reset the connection.
    async fn peer_state(&mut self) -> PeerState {
        if socket_error(self.socket()).is_some() {
            return PeerState::Reset;
        }
        match self {
            Connection::Plain(stream) => peer_state(stream),
            Connection::Tls(stream) => tls_peer_state(stream).await,
        }
    }

    /// True only for a reset: a plain close (FIN) after reading is not a loss.
    /// The socket's pending error comes first: a reset that followed a FIN
    /// reads as a plain end of stream.
    fn peer_reset(&self) -> bool {
        if socket_error(self.socket()).is_some() {
            return true;
        }
        match self {
            Connection::Plain(stream) => peer_reset(stream),
            // Reading the socket here would take bytes away from the TLS
            // layer.
            Connection::Tls(_) => false,
        }
    }

    /// Closes the sending side (TLS: close_notify first) and reads until
    /// the receiver closes its side. `Ok` means it did, and so read
    /// everything: a receiver that closes with data unread resets the
    /// connection instead.
    async fn close_and_read_to_end(&mut self) -> io::Result<()> {
        let mut buf = [0u8; 512];
        match self {
            Connection::Plain(stream) => {
                stream.shutdown().await?;
                while stream.read(&mut buf).await? > 0 {}
            }
            Connection::Tls(stream) => {
                stream.shutdown().await?;
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(_) => {}
                        // A receiver may close the TCP connection without
                        // a close_notify of its own.
                        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                        Err(e) => return Err(e),
                    }
                }
                // A close_notify comes before the receiver's TCP close,
                // which is a reset when it left data unread.
                let socket = &mut stream.get_mut().0;
                while socket.read(&mut buf).await? > 0 {}
            }
        }
        // A reset that followed the FIN reads as a plain end of stream.
        match socket_error(self.socket()) {
            Some(code) => Err(io::Error::from_raw_os_error(code)),
            None => Ok(()),
        }
    }
}

/// A syslog TCP or TLS transport.
///
/// TCP's acknowledgement does not mean that the receiver read a batch: a
/// receiver that stops or restarts with data unread in its socket loses
/// it, and neither its window nor anything else the kernel reports shows
/// how much it read. So every batch the transport delivered on a
/// connection stays unconfirmed until the receiver closes its side of the
/// connection after the sink closed its own (see
/// [`StreamTransport::finish`]), or closes it first (a plain TCP close; a
/// receiver that closes with data unread resets the connection instead).
/// The worker keeps the outbox entries of unconfirmed batches queued, and
/// sends them again from the outbox when the connection is lost. The sink
/// closes the connection for this before a batch once [`CONFIRM_BYTES`]
/// or [`CONFIRM_AGE`] is reached, and the worker after a pause and at the
/// end of a drain.
pub struct StreamTransport {
    address: String,
    tls: Option<TlsSettings>,
    stream: Option<Connection>,
    /// The opening time of the current connection, until its first batch
    /// is written (see [`NEW_CONNECTION_SETTLE`]).
    fresh: Option<Instant>,
    /// The start of the current connection's age: its opening, or the end
    /// of the wait for a close before its first batch counted.
    opened: Instant,
    /// The wait of the next connection's first batch for a close after TCP
    /// acknowledged it: zero, or [`UNREAD_CLOSE_SETTLE`] doubled for each
    /// young connection lost in a row with data unread.
    wary: Duration,
    /// Batches written on the current connection that the receiver has not
    /// confirmed reading, their bytes, and when the oldest was written.
    unconfirmed: usize,
    unconfirmed_bytes: usize,
    unconfirmed_since: Option<Instant>,
    /// Batches written on lost connections that the receiver may not have
    /// read, until the worker takes the count to send them again.
    lost: usize,
    /// True when the next connection follows one the receiver closed after
    /// reading everything: it skips the waits that catch a receiver that
    /// rejects connections, because that receiver just accepted one.
    rotated: bool,
    /// False for `confirm = "tcp-ack"`: batches count as delivered once TCP
    /// acknowledged them.
    confirms_by_close: bool,
    /// The sink's closes in a row that the receiver reset (see [`RESETS_ON_CLOSE_GIVE_UP`]).
    resets_on_close: u32,
    /// The receiver's failure to confirm the last batches by a close,
    /// until the next send reports it (see [`StreamTransport::finish`]).
    close_failed: Option<&'static str>,
    connect_timeout: Duration,
    write_timeout: Duration,
}

impl StreamTransport {
    /// A plain TCP transport when `tls` is `None`.
    pub fn new(address: String, tls: Option<TlsSettings>, connect_timeout: Duration, write_timeout: Duration) -> Self {
        Self {
            address,
            tls,
            stream: None,
            fresh: None,
            opened: Instant::now(),
            wary: Duration::ZERO,
            unconfirmed: 0,
            unconfirmed_bytes: 0,
            unconfirmed_since: None,
            lost: 0,
            rotated: false,
            confirms_by_close: true,
            resets_on_close: 0,
            close_failed: None,
            connect_timeout,
            write_timeout,
        }
    }

    /// Counts a batch as delivered once TCP acknowledged it, for
    /// `confirm = "tcp-ack"`, instead of waiting for the receiver's close.
    pub fn confirming_by_tcp_ack(self) -> Self {
        Self { confirms_by_close: false, ..self }
    }

    async fn connect(&mut self) -> Result<&mut Connection, SinkError> {
        if let Some(stream) = &mut self.stream {
            // Plain TCP has no application acknowledgement: a write into a
            // connection the peer already closed succeeds locally and is lost,
            // so a close that already arrived is detected before writing.
            let state = stream.peer_state().await;
            if state != PeerState::Open {
                tracing::info!(address = %self.address, ?state, "receiver closed or reset the connection; reconnecting");
                self.lose_connection();
            }
            // The batches the lost connection may not have delivered go
            // out again first, from the outbox.
            if self.lost > 0 {
                return Err(self.unread_error());
            }
        }
        if self.stream.is_none() {
            let address = self.address.clone();
            let secs = self.connect_timeout.as_secs();
            let rotated = std::mem::take(&mut self.rotated);
            let (mut connection, verdict_needed) = timeout(self.connect_timeout, self.open())
                .await
                .map_err(|_| SinkError::ConnectTimeout { address: address.clone(), secs })??;
            // Outside the connect timeout, which may be as short as the wait.
            if verdict_needed && !rotated {
                self.await_certificate_verdict(&mut connection).await?;
            }
            if rotated {
                tracing::debug!(address = %address, tls = self.tls.is_some(), "connected again after the receiver confirmed the last batches");
            } else {
                tracing::info!(address = %address, tls = self.tls.is_some(), "connected");
            }
            self.stream = Some(connection);
            self.fresh = (!rotated).then(Instant::now);
            self.opened = Instant::now();
        }
        self.stream.as_mut().ok_or_else(|| SinkError::PeerClosed { address: self.address.clone() })
    }

    /// Opens a connection. The flag is true when the receiver requested a
    /// client certificate in a TLS 1.3 handshake, so the caller must wait
    /// for its verdict on it before writing.
    async fn open(&self) -> Result<(Connection, bool), SinkError> {
        let address = self.address.clone();
        let stream = TcpStream::connect(&address)
            .await
            .map_err(|source| SinkError::Connect { address: address.clone(), source })?;
        let _ = stream.set_nodelay(true);
        set_keepalive(&stream);
        let Some(tls) = &self.tls else {
            return Ok((Connection::Plain(stream), false));
        };
        let requests_before = tls.certificate.as_ref().map(|certificate| certificate.requests());
        let requested = || tls.certificate.as_ref().map(|certificate| certificate.requests()) != requests_before;
        let session = match tls.connector.connect(tls.server_name.clone(), stream).await {
            Ok(session) => session,
            // TLS 1.2 checks the client's certificate inside the handshake.
            Err(source) if requested() && rejected_by_peer(&source) => return Err(self.certificate_rejected(Some(&source))),
            Err(source) => return Err(SinkError::Tls { address, source }),
        };
        let tls13 = session.get_ref().1.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        Ok((Connection::Tls(Box::new(session)), tls13 && requested()))
    }

    /// Builds the error for a receiver that rejected the session after it
    /// requested a client certificate: the sink has none, or the receiver
    /// does not accept the one it sent.
    fn certificate_rejected(&self, source: Option<&io::Error>) -> SinkError {
        let address = self.address.clone();
        let present = self.tls.as_ref().and_then(|tls| tls.certificate.as_ref()).is_some_and(|certificate| certificate.present());
        if !present {
            return SinkError::ClientCertificateRequired { address };
        }
        let alert = source.and_then(received_alert).map(|alert| format!(" (TLS alert {alert:?})")).unwrap_or_default();
        SinkError::ClientCertificateRejected { address, alert }
    }

    /// Waits up to [`CLIENT_CERTIFICATE_VERDICT`] for a receiver that
    /// requested a client certificate to reject the session. Every session
    /// is checked, not only the first: a receiver may be reconfigured to
    /// require the certificate, or a load balancer may pick one that does.
    async fn await_certificate_verdict(&self, connection: &mut Connection) -> Result<(), SinkError> {
        let Connection::Tls(session) = connection else { return Ok(()) };
        let address = self.address.clone();
        let mut buf = [0u8; 512];
        match timeout(CLIENT_CERTIFICATE_VERDICT, session.read(&mut buf)).await {
            Ok(Ok(0)) => Err(self.certificate_rejected(None)),
            // Some receivers (rsyslog with GnuTLS) close without an alert.
            Ok(Err(source)) if rejected_by_peer(&source) || source.kind() == io::ErrorKind::UnexpectedEof => {
                Err(self.certificate_rejected(Some(&source)))
            }
            Ok(Err(source)) => Err(SinkError::Send { address, source }),
            // Nothing, or data a syslog receiver should not send: the
            // session is accepted.
            Err(_) | Ok(Ok(_)) => {
                let certificate = self.tls.as_ref().and_then(|tls| tls.certificate.as_ref());
                if let Some(certificate) = certificate.filter(|c| !c.present() && !c.accepted_without()) {
                    certificate.set_accepted_without();
                    tracing::info!(
                        address = %address,
                        "the receiver requested a client certificate and accepted this sink's session without one; set tls_cert_file and tls_key_file if it should get one. Each new session waits up to 1 s for the receiver to reject it"
                    );
                }
                Ok(())
            }
        }
    }

    /// Completes when the connection has something to read: a close, a
    /// reset or data. Never completes without a connection.
    pub async fn readable(&self) {
        match &self.stream {
            Some(stream) => {
                let _ = stream.socket().readable().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Looks at the connection after [`StreamTransport::readable`]: a
    /// close or reset counts the batches the receiver may not have read
    /// as lost. Returns true when there are such batches.
    pub async fn check_connection(&mut self) -> bool {
        if let Some(stream) = &mut self.stream {
            let state = stream.peer_state().await;
            if state != PeerState::Open {
                tracing::info!(address = %self.address, ?state, "receiver closed or reset the idle connection");
                self.lose_connection();
            }
        }
        self.lost > 0
    }

    /// Opens the connection before the first batch, so the wait for a new
    /// connection to settle passes while the poller reads the API. A
    /// failure is left to the first send, which retries and reports it.
    pub async fn warm_up(&mut self) {
        if let Err(error) = self.connect().await {
            tracing::debug!(address = %self.address, error = %error, "could not open the connection before the first batch");
        }
    }

    /// Closes the connection after a send was abandoned; the next send
    /// opens a new one. Its unconfirmed batches stay queued in the outbox.
    pub fn close(&mut self) {
        self.stream = None;
        self.forget_unconfirmed();
    }

    fn forget_unconfirmed(&mut self) {
        self.unconfirmed = 0;
        self.unconfirmed_bytes = 0;
        self.unconfirmed_since = None;
    }

    /// Returns the number of the newest delivered batches that the
    /// receiver has not confirmed reading; the older ones are confirmed.
    pub fn unconfirmed(&mut self) -> usize {
        if !self.confirms_by_close {
            self.forget_unconfirmed();
        }
        self.unconfirmed
    }

    /// Returns, and resets, the number of batches delivered on lost
    /// connections that the receiver may not have read. The worker sends
    /// them again from the outbox.
    pub fn take_lost(&mut self) -> usize {
        std::mem::take(&mut self.lost)
    }

    /// True when batches wait to be sent again after a lost connection.
    pub fn lost_pending(&self) -> bool {
        self.lost > 0
    }

    /// True unless `confirm = "tcp-ack"` (see [`StreamTransport::finish`]).
    pub fn confirms_by_close(&self) -> bool {
        self.confirms_by_close
    }

    /// True when the unconfirmed batches reached [`CONFIRM_BYTES`] or
    /// [`CONFIRM_AGE`], so the next batch goes on a new connection after
    /// the receiver confirmed them.
    fn confirmation_due(&self) -> bool {
        self.confirms_by_close
            && self.stream.is_some()
            && (self.unconfirmed_bytes >= CONFIRM_BYTES || self.unconfirmed_since.is_some_and(|since| since.elapsed() >= CONFIRM_AGE))
    }

    /// Closes the connection so that the receiver confirms it read the
    /// unconfirmed batches: it closes its side once it has read
    /// everything, and a receiver that closes with data unread resets the
    /// connection instead. Waits up to the write timeout. A close from the
    /// receiver that came first confirms nothing: a receiver may shut
    /// down its side and reset the connection only later.
    ///
    /// A receiver may not close its side by then, or may reset
    /// [`RESETS_ON_CLOSE_GIVE_UP`] closes in a row. Then the next send fails
    /// with an error that suggests `confirm = "tcp-ack"`, so the batches go
    /// again after the worker's retry delay, not at once.
    pub async fn finish(&mut self) -> Finish {
        if self.unconfirmed() == 0 {
            return Finish::Read;
        }
        let Some(stream) = self.stream.as_mut() else { return Finish::NoAnswer };
        if stream.peer_state().await != PeerState::Open {
            self.lose_connection();
            return Finish::Lost;
        }
        match timeout(self.write_timeout, stream.close_and_read_to_end()).await {
            Ok(Ok(())) => {
                self.stream = None;
                self.forget_unconfirmed();
                self.rotated = true;
                self.resets_on_close = 0;
                Finish::Read
            }
            Ok(Err(_)) => {
                self.resets_on_close += 1;
                if self.resets_on_close >= RESETS_ON_CLOSE_GIVE_UP {
                    self.close_failed = Some("reset the connection at each of the last 3 closes of the sink");
                }
                self.lose_connection();
                Finish::Lost
            }
            Err(_) => {
                self.close_failed = Some("did not close its side of the connection within write_timeout_secs after the sink closed its own");
                self.lose_connection();
                Finish::NoAnswer
            }
        }
    }

    /// Counts the batches the receiver may not have read on the connection
    /// just lost as lost. When the lost connection was young, the next one
    /// waits for a close before its first batch counts.
    fn lose_connection(&mut self) {
        self.stream = None;
        // Batches still to send again went out on this connection too,
        // unless it failed before writing them.
        let unread = self.unconfirmed > 0 || self.lost > 0;
        self.wary = if unread && self.opened.elapsed() < YOUNG_CONNECTION {
            (self.wary * 2).clamp(UNREAD_CLOSE_SETTLE, YOUNG_CONNECTION)
        } else {
            Duration::ZERO
        };
        self.lost += self.unconfirmed;
        self.forget_unconfirmed();
    }

    /// Returns the error for a send that found the connection lost with
    /// batches the receiver may not have read.
    fn unread_error(&self) -> SinkError {
        SinkError::LostUnread { address: self.address.clone(), batches: self.lost }
    }

    pub async fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let result = self.try_send(batch).await;
        match &result {
            // The connection is gone already.
            Err(SinkError::LostUnread { .. }) | Ok(()) => {}
            // A reset, or a receiver that stopped reading and is then
            // restarted, may take batches delivered before this one.
            Err(_) => self.lose_connection(),
        }
        result
    }

    async fn try_send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let address = self.address.clone();
        let write_timeout = self.write_timeout;
        if let Some(behaviour) = self.close_failed.take() {
            return Err(SinkError::CloseUnconfirmed { address, behaviour });
        }
        if self.confirmation_due() && self.finish().await != Finish::Read {
            return Err(self.unread_error());
        }
        self.connect().await?;
        let first = self.fresh.is_some();
        if let Some(opened) = self.fresh.take() {
            tokio::time::sleep_until(opened + NEW_CONNECTION_SETTLE).await;
            if let Some(stream) = self.stream.as_mut() {
                if stream.peer_state().await != PeerState::Open {
                    return Err(SinkError::ClosedUnread { address });
                }
            }
        }
        let Some(stream) = self.stream.as_mut() else { return Err(SinkError::PeerClosed { address }) };
        let deadline = Instant::now() + write_timeout;
        let timed_out = || SinkError::SendTimeout { address: address.clone(), secs: write_timeout.as_secs() };
        timeout(write_timeout, stream.write_and_flush(batch.bytes()))
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| SinkError::Send { address: address.clone(), source })?;
        // From here the receiver may hold the batch: a lost connection
        // counts it with the others it may not have read.
        self.unconfirmed += 1;
        self.unconfirmed_bytes += batch.bytes().len();
        self.unconfirmed_since.get_or_insert_with(Instant::now);
        let Some(stream) = self.stream.as_mut() else { return Err(SinkError::PeerClosed { address }) };
        // Wait until the peer's TCP stack has acknowledged every byte, so a
        // batch still in our send queue is never counted as delivered.
        // An ioctl failure leaves the queue unknown, so the batch is sent again.
        while unacknowledged_bytes(stream.socket()).map_err(|source| SinkError::Send { address: address.clone(), source })? > 0 {
            // A reset leaves the unacknowledged bytes in the count forever.
            if socket_error(stream.socket()).is_some() {
                return Err(SinkError::PeerClosed { address });
            }
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A reset after the data was acknowledged means the receiver
        // closed without reading it; send the batch again.
        if stream.peer_reset() {
            return Err(SinkError::PeerClosed { address });
        }
        if first && !self.wary.is_zero() {
            tokio::time::sleep(self.wary).await;
            // The connection's age counts from here, so a close seen at the
            // end of a long wait, or soon after it, is still a young one.
            self.opened = Instant::now();
            let open = match self.stream.as_mut() {
                Some(stream) => stream.peer_state().await == PeerState::Open,
                None => false,
            };
            if !open {
                return Err(SinkError::ClosedUnread { address });
            }
        }
        Ok(())
    }
}

/// True when a failed handshake ended with an alert from the receiver, not
/// with a check of this side (such as the receiver's certificate).
fn rejected_by_peer(error: &io::Error) -> bool {
    received_alert(error).is_some()
}

/// Returns the alert the receiver sent, when the error is one.
fn received_alert(error: &io::Error) -> Option<rustls::AlertDescription> {
    match error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
        _ => None,
    }
}

/// Reads (and discards) whatever the peer sent, and returns whether it
/// closed or reset the connection.
fn peer_state(stream: &TcpStream) -> PeerState {
    let mut buf = [0u8; 512];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return PeerState::Closed,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return PeerState::Open,
            Err(_) => return PeerState::Reset,
        }
    }
}

/// Reads through TLS whatever has arrived, so session tickets and alerts
/// are processed, and returns whether the peer closed (close_notify or FIN)
/// or reset the connection. A TLS error counts as a reset.
async fn tls_peer_state(stream: &mut TlsStream<TcpStream>) -> PeerState {
    let mut buf = [0u8; 512];
    loop {
        // `timeout` polls the read once before it looks at the zero
        // deadline, so this never waits for data that has not arrived.
        match timeout(Duration::ZERO, stream.read(&mut buf)).await {
            Err(_) => return PeerState::Open,
            Ok(Ok(0)) => return PeerState::Closed,
            Ok(Ok(_)) => continue,
            Ok(Err(_)) => return PeerState::Reset,
        }
    }
}

/// True only for a reset: a plain close (FIN) after reading is not a loss.
fn peer_reset(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// The socket's pending error (`SO_ERROR`), such as `ECONNRESET` after a reset.
fn socket_error(stream: &TcpStream) -> Option<i32> {
    let mut error: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `error`; the fd is owned by `stream`.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut error as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0 && error != 0).then_some(error)
}

/// Bytes in the socket's send queue, not yet sent or not yet acknowledged by the peer.
///
/// Linux `<linux/sockios.h>` defines `SIOCOUTQ` as `TIOCOUTQ`, so the
/// `TIOCOUTQ` constant that libc exports returns the same count for a socket.
fn unacknowledged_bytes(socket: &impl AsRawFd) -> io::Result<i32> {
    let mut pending: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer we pass; the caller owns the fd.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut pending as *mut libc::c_int) };
    if rc == 0 {
        Ok(pending)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_keepalive(stream: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int of the given size; the fd is owned by `stream`.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_KEEPALIVE,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicBool, Ordering};

    use rustls::server::WebPkiClientVerifier;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::net::TcpListener;

    const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

    /// Starts a TLS receiver that requests a client certificate signed by
    /// `tls-client-ca.pem`, optional while `required` is false, required
    /// after. It keeps the lines it receives.
    async fn receiver(required: Arc<AtomicBool>, received: Arc<std::sync::Mutex<Vec<u8>>>) -> std::net::SocketAddr {
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(format!("{DATA}/tls-client-ca.pem")).unwrap()).unwrap();
        let roots = Arc::new(roots);

        let chain = vec![CertificateDer::from_pem_file(format!("{DATA}/tls-server-cert.pem")).unwrap()];
        let key = PrivateKeyDer::from_pem_file(format!("{DATA}/tls-server-key.pem")).unwrap();
        let config = |required: bool| {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
            let verifier = if required { verifier.build() } else { verifier.allow_unauthenticated().build() };
            let config = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier.unwrap())
                .with_single_cert(chain.clone(), key.clone_key())
                .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        };
        let (optional, strict) = (config(false), config(true));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let acceptor = if required.load(Ordering::SeqCst) { strict.clone() } else { optional.clone() };
                let received = received.clone();
                tokio::spawn(async move {
                    let Ok(mut session) = acceptor.accept(stream).await else { return };
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = session.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        received.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        address
    }

    /// A receiver that accepted a session without a client certificate and
    /// then requires one: the next session is rejected before a batch is
    /// written, so no batch counts as delivered into it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_session_waits_for_the_certificate_verdict() {
        let required = Arc::new(AtomicBool::new(false));
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let address = receiver(required.clone(), received.clone()).await;
        let tls = crate::config::TlsConfig { tls_ca_file: Some(format!("{DATA}/tls-ca.pem").into()), tls_insecure_skip_verify: false };
        let (config, certificate) = crate::sink::tls::client_config_watching("sink[0]", &tls, None).unwrap();
        let settings = TlsSettings::new(config, ServerName::try_from("localhost").unwrap()).watching(certificate);
        let mut transport = StreamTransport::new(address.to_string(), Some(settings), Duration::from_secs(5), Duration::from_secs(5));
        let mut batch = Batch::default();
        batch.push_message(b"first\n");

        transport.send(&batch).await.expect("an optional request accepts the session");
        assert!(wait_until_received(&received, b"first\n").await, "the first batch arrives");

        required.store(true, Ordering::SeqCst);
        transport.close();
        let error = transport.send(&batch).await.expect_err("a required certificate rejects the session");
        assert!(matches!(error, SinkError::ClientCertificateRequired { .. }), "{error}");
        let error = transport.send(&batch).await.expect_err("every new session is checked");
        assert!(matches!(error, SinkError::ClientCertificateRequired { .. }), "{error}");
        assert_eq!(received.lock().unwrap().as_slice(), b"first\n");
    }

    /// Builds a transport to `address` with the client certificate in
    /// `tests/data/{name}-cert.pem` and its key.
    fn transport_with_certificate(address: std::net::SocketAddr, name: &str) -> StreamTransport {
        let tls = crate::config::TlsConfig { tls_ca_file: Some(format!("{DATA}/tls-ca.pem").into()), tls_insecure_skip_verify: false };
        let (cert_file, key_file) = (format!("{DATA}/{name}-cert.pem"), format!("{DATA}/{name}-key.pem"));
        let identity = crate::sink::tls::ClientIdentity { cert_file: cert_file.as_ref(), key_file: key_file.as_ref() };
        let (config, certificate) = crate::sink::tls::client_config_watching("sink[0]", &tls, Some(identity)).unwrap();
        let settings = TlsSettings::new(config, ServerName::try_from("localhost").unwrap()).watching(certificate);
        StreamTransport::new(address.to_string(), Some(settings), Duration::from_secs(5), Duration::from_secs(5))
    }

    /// A TLS 1.3 receiver that does not trust the sink's client certificate
    /// rejects it only after the sink's handshake is complete. No batch may
    /// count as delivered into such a session.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn untrusted_client_certificate_delivers_nothing() {
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let address = receiver(Arc::new(AtomicBool::new(true)), received.clone()).await;
        // Self-signed, so the receiver does not trust it.
        let mut transport = transport_with_certificate(address, "client");
        let mut batch = Batch::default();
        batch.push_message(b"line\n");
        for _ in 0..10 {
            let error = transport.send(&batch).await.expect_err("every session is rejected");
            assert!(matches!(error, SinkError::ClientCertificateRejected { .. }), "{error}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rejection_names_the_receivers_alert() {
        let address = receiver(Arc::new(AtomicBool::new(true)), Arc::default()).await;
        let mut transport = transport_with_certificate(address, "client");
        let mut batch = Batch::default();
        batch.push_message(b"line\n");
        let error = transport.send(&batch).await.expect_err("the session is rejected").to_string();
        assert!(error.contains("alert"), "{error}");
    }

    /// The same receiver accepts a certificate signed by the CA it trusts,
    /// after the sink waited for its verdict.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn trusted_client_certificate_delivers() {
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let address = receiver(Arc::new(AtomicBool::new(true)), received.clone()).await;
        let mut transport = transport_with_certificate(address, "tls-client");
        let mut batch = Batch::default();
        batch.push_message(b"line\n");
        transport.send(&batch).await.expect("a trusted certificate is accepted");
        transport.send(&batch).await.expect("the session stays open");
        assert!(wait_until_received(&received, b"line\nline\n").await, "both batches arrive");
    }

    async fn wait_until_received(received: &std::sync::Mutex<Vec<u8>>, expected: &[u8]) -> bool {
        for _ in 0..100 {
            if received.lock().unwrap().as_slice() == expected {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// The handling of one connection by a scripted receiver.
    #[derive(Clone, Copy)]
    enum Plan {
        /// Closes it unread after this many milliseconds.
        CloseUnreadAfter(u64),
        /// Reads once, then closes it.
        ReadOnceThenClose,
        /// Reads it to the end.
        ReadAll,
        /// Reads it to the end and keeps its side open.
        ReadKeepOpen,
    }

    /// Starts a receiver that handles connection N (from 1) as `plan(N)`
    /// describes, and keeps what it reads.
    async fn scripted_receiver(plan: fn(usize) -> Plan) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = received.clone();
        tokio::spawn(async move {
            let mut accepted = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted += 1;
                let store = store.clone();
                let plan = plan(accepted);
                tokio::spawn(async move {
                    if let Plan::CloseUnreadAfter(ms) = plan {
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        store.lock().unwrap().extend_from_slice(&buf[..n]);
                        if matches!(plan, Plan::ReadOnceThenClose) {
                            return;
                        }
                    }
                    if matches!(plan, Plan::ReadKeepOpen) {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                });
            }
        });
        (address, received)
    }

    /// A receiver that accepts each connection and closes it a moment
    /// later without reading, as one at its connection limit does.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receiver_closing_unread_connections_gets_nothing_counted() {
        let (address, _) = scripted_receiver(|_| Plan::CloseUnreadAfter(5)).await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        let mut batch = Batch::default();
        batch.push_message(b"line\n");
        for _ in 0..8 {
            let error = transport.send(&batch).await.expect_err("no batch counts as delivered");
            assert!(matches!(error, SinkError::ClosedUnread { .. } | SinkError::PeerClosed { .. }), "{error}");
        }
    }

    /// Starts a receiver that keeps its first connection open, unread,
    /// until `stop` is sent, then drops it (a reset, since data is unread),
    /// as a receiver that restarts does. It reads later connections.
    async fn restarting_receiver() -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, Arc<std::sync::Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let store = received.clone();
        tokio::spawn(async move {
            let (first, _) = listener.accept().await.unwrap();
            let _ = stopped.await;
            drop(first);
            while let Ok((mut stream, _)) = listener.accept().await {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        store.lock().unwrap().extend_from_slice(&buf[..n]);
                    }
                });
            }
        });
        (address, stop, received)
    }

    /// A receiver that resets the connection with a delivered batch unread
    /// makes the next send fail before it writes, with that batch counted
    /// as lost, so the worker sends it again first.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reset_counts_unread_batch_lost() {
        let (address, stop, received) = restarting_receiver().await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        // A detection's size: the receive window shows it unread.
        let line = format!("first {}\n", "x".repeat(2000));
        let (mut first, mut second) = (Batch::default(), Batch::default());
        first.push_message(line.as_bytes());
        second.push_message(b"second\n");
        transport.send(&first).await.expect("TCP acknowledges the first batch");
        assert_eq!(transport.unconfirmed(), 1, "the receiver has not read it");

        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let error = transport.send(&second).await.expect_err("the first batch goes again before the second");
        assert!(matches!(error, SinkError::LostUnread { batches: 1, .. }), "{error}");
        assert_eq!(transport.take_lost(), 1);
        transport.send(&first).await.expect("the first batch goes out on a new connection");
        transport.send(&second).await.unwrap();
        let expected = format!("{line}second\n");
        assert!(wait_until_received(&received, expected.as_bytes()).await, "{:?}", String::from_utf8_lossy(&received.lock().unwrap()));
    }

    /// Unconfirmed batches older than [`CONFIRM_AGE`] make the next send
    /// close the connection first: the receiver confirms them by closing
    /// its side, and the next batch goes on a new connection.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn old_batches_confirmed_by_close() {
        let (address, received) = scripted_receiver(|_| Plan::ReadAll).await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        let (mut first, mut second) = (Batch::default(), Batch::default());
        first.push_message(b"first\n");
        second.push_message(b"second\n");
        transport.send(&first).await.unwrap();
        transport.send(&second).await.unwrap();
        assert_eq!(transport.unconfirmed(), 2);
        transport.unconfirmed_since = Some(Instant::now() - CONFIRM_AGE);
        transport.send(&first).await.unwrap();
        assert_eq!(transport.unconfirmed(), 1, "only the batch on the new connection waits");
        assert!(wait_until_received(&received, b"first\nsecond\nfirst\n").await);
    }

    /// A receiver that stops reading leaves its batch unconfirmed, however
    /// long the sink waits.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stalled_receiver_confirms_nothing() {
        let (address, _stop, _) = restarting_receiver().await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        let mut batch = Batch::default();
        batch.push_message(format!("only {}\n", "x".repeat(4000)).as_bytes());
        transport.send(&batch).await.unwrap();
        for _ in 0..5 {
            assert_eq!(transport.unconfirmed(), 1);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// A reset of an idle connection is seen at once, and the batch the
    /// receiver had not read counts as lost without waiting for another.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn idle_reset_is_seen_without_a_batch() {
        let (address, stop, _) = restarting_receiver().await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        let line = format!("first {}\n", "x".repeat(4000));
        let mut first = Batch::default();
        first.push_message(line.as_bytes());
        transport.send(&first).await.unwrap();

        stop.send(()).unwrap();
        timeout(Duration::from_secs(5), transport.readable()).await.expect("the reset makes the socket readable");
        assert!(transport.check_connection().await, "the unread batch waits to be sent again");
        assert_eq!(transport.take_lost(), 1);
    }

    /// A receiver that reads to the end and closes after the sink's close
    /// confirms every batch. One that resets, or closed first, loses them.
    /// One that keeps its side open loses them too, and the next send
    /// fails with advice before the retry sends them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finish_waits_for_the_receivers_close() {
        let mut batch = Batch::default();
        batch.push_message(format!("only {}\n", "x".repeat(4000)).as_bytes());

        let (address, received) = scripted_receiver(|_| Plan::ReadAll).await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        transport.send(&batch).await.unwrap();
        assert_eq!(transport.finish().await, Finish::Read);
        assert_eq!(received.lock().unwrap().as_slice(), batch.bytes());

        let (address, stop, _) = restarting_receiver().await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        transport.send(&batch).await.unwrap();
        let finishing = tokio::spawn(async move { (transport.finish().await, transport.take_lost()) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop.send(()).unwrap();
        assert_eq!(finishing.await.unwrap(), (Finish::Lost, 1));

        let (address, _) = scripted_receiver(|n| if n == 1 { Plan::ReadOnceThenClose } else { Plan::ReadAll }).await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        transport.send(&batch).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(transport.finish().await, Finish::Lost, "a close that came first confirms nothing");

        let (address, _) = scripted_receiver(|_| Plan::ReadKeepOpen).await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(1));
        transport.send(&batch).await.unwrap();
        assert_eq!(transport.finish().await, Finish::NoAnswer);
        assert_eq!(transport.take_lost(), 1, "the batch goes again");
        let error = transport.send(&batch).await.expect_err("the next send reports the missing close first");
        assert!(matches!(error, SinkError::CloseUnconfirmed { .. }), "{error}");
        assert!(error.to_string().contains("confirm = \"tcp-ack\""), "{error}");
        transport.send(&batch).await.expect("the retry sends the batch");
    }

    /// A receiver that closes every connection unread 1.2 s after accepting
    /// it outlasts the first 1 s wait, not the doubled one after it: the
    /// batch then never counts as delivered again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn repeated_late_unread_closes_become_errors() {
        let (address, _) = scripted_receiver(|_| Plan::CloseUnreadAfter(1200)).await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        let mut batch = Batch::default();
        batch.push_message(format!("only {}\n", "x".repeat(4000)).as_bytes());
        transport.send(&batch).await.expect("nothing is known of the receiver yet");
        timeout(Duration::from_secs(5), transport.readable()).await.unwrap();
        assert!(transport.check_connection().await);
        assert_eq!(transport.take_lost(), 1);
        transport.send(&batch).await.expect("the close comes after the 1 s wait");
        timeout(Duration::from_secs(5), transport.readable()).await.unwrap();
        assert!(transport.check_connection().await);
        assert_eq!(transport.take_lost(), 1);
        let error = transport.send(&batch).await.expect_err("the 2 s wait sees the close");
        assert!(matches!(error, SinkError::ClosedUnread { .. }), "{error}");
        assert_eq!(transport.take_lost(), 1, "the batch went out and counts as lost");
        let error = transport.send(&batch).await.expect_err("the retry waits 4 s and sees the close");
        assert!(matches!(error, SinkError::ClosedUnread { .. }), "{error}");
        assert_eq!(transport.take_lost(), 1);
        // A close seen at the end of a wait keeps the next one from shrinking.
        assert_eq!(transport.wary, Duration::from_secs(8));
    }

    /// A close seen at the end of the longest wait still counts as one on a
    /// young connection, so the wait stays at its longest instead of
    /// falling back to none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn longest_wait_stays_after_a_close() {
        let (address, _) = scripted_receiver(|_| Plan::CloseUnreadAfter(200)).await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        transport.wary = YOUNG_CONNECTION;
        let mut batch = Batch::default();
        batch.push_message(format!("kept {}\n", "x".repeat(4000)).as_bytes());
        let error = transport.send(&batch).await.expect_err("the wait sees the close");
        assert!(matches!(error, SinkError::ClosedUnread { .. }), "{error}");
        assert_eq!(transport.wary, YOUNG_CONNECTION);
    }

    /// A receiver that closes first confirms nothing, because it may shut
    /// down its side with data unread and reset the connection later: the
    /// batch goes again, before the next one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn receivers_own_close_confirms_nothing() {
        let (address, received) = scripted_receiver(|n| if n == 1 { Plan::ReadOnceThenClose } else { Plan::ReadAll }).await;
        let mut transport = StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5));
        let (mut first, mut second) = (Batch::default(), Batch::default());
        first.push_message(b"first\n");
        second.push_message(b"second\n");
        transport.send(&first).await.unwrap();
        assert!(wait_until_received(&received, b"first\n").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let error = transport.send(&second).await.expect_err("the first batch goes again first");
        assert!(matches!(error, SinkError::LostUnread { batches: 1, .. }), "{error}");
        assert_eq!(transport.take_lost(), 1);
        transport.send(&first).await.unwrap();
        transport.send(&second).await.unwrap();
        assert!(wait_until_received(&received, b"first\nfirst\nsecond\n").await, "{:?}", String::from_utf8_lossy(&received.lock().unwrap()));
    }

    /// With `confirm = "tcp-ack"`, a batch counts once TCP acknowledged it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tcp_ack_confirms_at_once() {
        let (address, _) = scripted_receiver(|_| Plan::ReadKeepOpen).await;
        let mut transport =
            StreamTransport::new(address.to_string(), None, Duration::from_secs(5), Duration::from_secs(5)).confirming_by_tcp_ack();
        let mut batch = Batch::default();
        batch.push_message(b"only\n");
        transport.send(&batch).await.unwrap();
        assert_eq!(transport.unconfirmed(), 0);
        assert_eq!(transport.finish().await, Finish::Read, "nothing waits for a close");
    }

    #[test]
    fn unacknowledged_bytes_reports_ioctl_failure() {
        // TIOCOUTQ on a regular file fails with ENOTTY: the queue is unknown,
        // which must not read as "nothing left to acknowledge".
        let file = tempfile::tempfile().unwrap();
        let result = unacknowledged_bytes(&file);
        assert!(result.is_err(), "{result:?}");
    }

    #[tokio::test]
    async fn unacknowledged_bytes_reads_a_tcp_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        assert_eq!(unacknowledged_bytes(&stream).unwrap(), 0);
    }
}
