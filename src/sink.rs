//! Transports: they move already-encoded bytes and know nothing of formats.
//!
//! A batch is a buffer of framed messages plus the end offset of each message.
//! `send` returns only when the batch is acknowledged in the transport's own
//! terms: TCP bytes written and acknowledged by the peer's TCP stack, a file
//! written and fsync'ed, stdout flushed, UDP datagrams handed to the kernel.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{timeout, Instant};

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
    #[error("write to {path} failed: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("write to standard output failed: {0}")]
    Stdout(io::Error),
}

/// A batch of framed messages: `bytes` holds them back to back and `ends[i]`
/// is the offset just past message `i`.
#[derive(Debug, Default)]
pub struct Batch {
    pub bytes: Vec<u8>,
    pub ends: Vec<usize>,
}

impl Batch {
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.ends.clear();
    }

    /// Marks the end of the message just appended to `bytes`.
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
}

pub enum Transport {
    Tcp(TcpTransport),
    Udp(UdpTransport),
    File(FileTransport),
    Stdout,
}

impl Transport {
    pub async fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        match self {
            Transport::Tcp(t) => t.send(batch).await,
            Transport::Udp(t) => t.send(batch).await,
            Transport::File(t) => t.send(batch).await,
            Transport::Stdout => {
                let mut out = tokio::io::stdout();
                out.write_all(&batch.bytes).await.map_err(SinkError::Stdout)?;
                out.flush().await.map_err(SinkError::Stdout)
            }
        }
    }
}

pub struct TcpTransport {
    address: String,
    stream: Option<TcpStream>,
    connect_timeout: Duration,
    write_timeout: Duration,
}

impl TcpTransport {
    pub fn new(address: String, connect_timeout: Duration, write_timeout: Duration) -> Self {
        Self { address, stream: None, connect_timeout, write_timeout }
    }

    async fn connect(&mut self) -> Result<&mut TcpStream, SinkError> {
        if let Some(stream) = &self.stream {
            // Plain TCP has no application acknowledgement: a write into a
            // connection the peer already closed succeeds locally and is lost,
            // so a close that already arrived is detected before writing.
            if peer_closed(stream) {
                tracing::info!(address = %self.address, "receiver closed the connection; reconnecting");
                self.stream = None;
            }
        }
        if self.stream.is_none() {
            let address = self.address.clone();
            let stream = timeout(self.connect_timeout, TcpStream::connect(&address))
                .await
                .map_err(|_| SinkError::ConnectTimeout { address: address.clone(), secs: self.connect_timeout.as_secs() })?
                .map_err(|source| SinkError::Connect { address: address.clone(), source })?;
            let _ = stream.set_nodelay(true);
            set_keepalive(&stream);
            tracing::info!(address = %address, "connected");
            self.stream = Some(stream);
        }
        self.stream.as_mut().ok_or_else(|| SinkError::PeerClosed { address: self.address.clone() })
    }

    async fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let result = self.try_send(batch).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn try_send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let address = self.address.clone();
        let write_timeout = self.write_timeout;
        let stream = self.connect().await?;
        let deadline = Instant::now() + write_timeout;
        let timed_out = || SinkError::SendTimeout { address: address.clone(), secs: write_timeout.as_secs() };
        let write = async {
            stream.write_all(&batch.bytes).await?;
            stream.flush().await
        };
        timeout(write_timeout, write)
            .await
            .map_err(|_| timed_out())?
            .map_err(|source| SinkError::Send { address: address.clone(), source })?;
        // Wait until the peer's TCP stack has acknowledged every byte, so a
        // batch still in our send queue is never counted as delivered.
        while unacknowledged_bytes(stream) > 0 {
            if Instant::now() >= deadline {
                return Err(timed_out());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // A reset right after the data was acknowledged means the receiver
        // closed without reading it; send the batch again.
        if peer_reset(stream) {
            return Err(SinkError::PeerClosed { address });
        }
        Ok(())
    }
}

/// Reads (and discards) whatever the peer sent; true when it closed or reset.
fn peer_closed(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match stream.try_read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
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

/// Bytes in the socket's send queue not yet acknowledged by the peer (Linux `SIOCOUTQ`).
fn unacknowledged_bytes(stream: &TcpStream) -> i32 {
    let mut pending: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int through the pointer we pass; the fd is owned by `stream`.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &mut pending as *mut libc::c_int) };
    if rc == 0 {
        pending
    } else {
        0
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

pub struct FileTransport {
    path: PathBuf,
    file: Option<tokio::fs::File>,
}

impl FileTransport {
    pub fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }

    async fn send(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let path = self.path.clone();
        let err = |source| SinkError::File { path: path.clone(), source };
        if self.file.is_none() {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                tokio::fs::create_dir_all(parent).await.map_err(err)?;
            }
            let file = tokio::fs::OpenOptions::new().create(true).append(true).mode(0o640).open(&path).await.map_err(err)?;
            self.file = Some(file);
        }
        let Some(file) = self.file.as_mut() else { return Ok(()) };
        let result = async {
            file.write_all(&batch.bytes).await?;
            file.flush().await?;
            file.sync_data().await
        }
        .await;
        if let Err(source) = result {
            // Reopen next time: the file may have been rotated or the disk freed.
            self.file = None;
            return Err(err(source));
        }
        Ok(())
    }
}
