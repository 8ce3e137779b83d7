//! An emulator of the Defender for Endpoint SIEM REST API (`GET /api/alerts`)
//! and of the Azure AD token endpoint, for the `demo` and `emulate` commands
//! and for tests.
//!
//! It serves HTTP/1.1 on one address:
//!
//! - `POST /{tenant}/oauth2/token` (Azure AD v1, form field `resource`) and
//!   `POST /{tenant}/oauth2/v2.0/token` (v2, form field `scope`) issue opaque
//!   bearer tokens for the client credentials grant, with a client secret or
//!   a certificate's client assertion (see [`Emulator::add_client_certificate`]).
//!   Errors carry Azure AD's JSON error body with an `AADSTS` code.
//! - `GET /api/alerts` returns the token's tenant's detections as a JSON
//!   array, filtered by `sinceTimeUtc`, `untilTimeUtc`, `ago`, `limit`,
//!   `machinegroups`, `DeviceCreatedMachineTags` and
//!   `CloudCreatedMachineTags`, with the documented defaults. A successful
//!   response is gzip-compressed when the request sends
//!   `Accept-Encoding: gzip`.
//! - `/_emulator/...` is a control API for clients in another process.
//!
//! Injected faults ([`Fault`]) wait in a FIFO queue, and each `/api/alerts`
//! request takes at most one of them before normal handling.
//!
//! # Control API
//!
//! Anyone who can reach the listening address can use it, so bind to a
//! loopback address.
//!
//! - `POST /_emulator/faults` queues one fault described by a JSON object,
//!   or `count` copies of it:
//!   - `{"status": 429, "retry_after_secs": 2, "body": "..."}` responds with
//!     that status, a `Retry-After` header when given, and the body (default
//!     empty). `"kind": "status"` may be added.
//!   - `{"kind": "empty"}` responds 200 with an empty body.
//!   - `{"kind": "html"}` responds 200 with a `text/html` proxy error page.
//!   - `{"kind": "truncated"}` responds 200 with the normal array cut in half.
//!   - `{"kind": "not_array"}` responds 200 with `{"value":[]}`.
//!   - `{"kind": "slow", "secs": 3}` waits that many seconds (a fraction is
//!     allowed) and then responds normally.
//!   - `{"kind": "unauthorized"}` responds 401 although the token is valid.
//!
//!   The response is `{"queued": N}`, the queue length after the call.
//! - `POST /_emulator/detections?tenant=ID&count=N` adds N new detections
//!   (default 1) to the tenant, as [`Emulator::new_detection`] does, and
//!   returns them as a JSON array. With a JSON array as the request body it
//!   adds its elements instead and returns them: each is served exactly as
//!   sent, with its escapes, number spelling and whitespace, lone surrogates
//!   included. `tenant` may be left out when the emulator has exactly one
//!   tenant.
//! - `POST /_emulator/tokens/revoke` invalidates every issued token.
//! - `GET /_emulator/stats` returns
//!   `{"tenants": {"ID": {"detections": N}}, "alerts_requests": N,
//!   "token_requests": N, "faults_queued": N}`.

/// Splits a JSON array into the texts of its elements without decoding
/// them, so an element is served byte for byte as given, with escapes,
/// numbers such as `1E400` and lone surrogates (`\ud800`) left as they are.
pub fn parse_detection_texts(json: &[u8]) -> Result<Vec<Box<serde_json::value::RawValue>>, serde_json::Error> {
    serde_json::from_slice(json)
}

mod alerts;
mod assertion;
mod cli;
mod control;
mod data;
mod query;
mod server;
mod state;
mod token;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use cli::{run_cli, EmulateArgs};
pub use data::sample_detections;

use state::{Shared, StoredDetection};

/// Settings fixed when the emulator starts; [`Emulator::set_token_lifetime`]
/// changes the lifetime later.
#[derive(Debug, Clone)]
pub struct EmulatorOptions {
    /// Lifetime of issued tokens; `expires_in` reports it in whole seconds.
    pub token_lifetime: Duration,
    pub expiry_format: ExpiryFormat,
}

impl Default for EmulatorOptions {
    fn default() -> Self {
        Self { token_lifetime: Duration::from_secs(3599), expiry_format: ExpiryFormat::Number }
    }
}

/// Format of `expires_in`, `ext_expires_in`, `expires_on` and `not_before`
/// in token responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpiryFormat {
    /// JSON numbers, as Azure AD v2 sends them.
    #[default]
    Number,
    /// JSON strings of digits, as Azure AD v1 sends them.
    String,
    /// Left out of the response.
    Missing,
}

/// A tenant's client credentials and onboarding state.
#[derive(Clone)]
pub struct TenantSpec {
    pub client_id: String,
    pub client_secret: String,
    /// The tenant is not onboarded, so `/api/alerts` returns 403 although its
    /// tokens are valid.
    pub forbidden: bool,
}

impl fmt::Debug for TenantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantSpec")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("forbidden", &self.forbidden)
            .finish()
    }
}

/// A misbehaviour of the next `/api/alerts` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Responds with this status, a `Retry-After` header when given, and this body.
    Status { status: u16, retry_after_secs: Option<u64>, body: String },
    /// Responds 200 with an empty body.
    EmptyOk,
    /// Responds 200 with a `text/html` proxy error page.
    Html,
    /// Responds 200 with the normal JSON array cut in the middle. A request
    /// that fails normally (401, 403, 400) gets its normal error instead.
    Truncated,
    /// Responds 200 with the JSON object `{"value":[]}`.
    NotArray,
    /// Waits this long, then responds normally.
    Slow(Duration),
    /// Responds 401 even for a valid token.
    Unauthorized,
}

/// One `/api/alerts` request and the status the emulator returned.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub path: String,
    /// Query parameters, percent-decoded, in request order.
    pub query: Vec<(String, String)>,
    pub status: u16,
    /// The tenant of a valid bearer token, else `None`.
    pub tenant_id: Option<String>,
    pub user_agent: Option<String>,
    /// The response body was gzip-compressed, because the request accepted gzip.
    pub gzip: bool,
}

/// A running emulator. Clones share the same server; the server stops on
/// [`Emulator::shutdown`] or when the last clone is dropped.
#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

struct Inner {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// Set to `true` to stop accepting and drain connections. Dropping the
    /// sender has the same effect, so a dropped emulator stops too.
    stop: watch::Sender<bool>,
    server: Mutex<Option<JoinHandle<()>>>,
    generators: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for generator in self.generators.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            generator.abort();
        }
    }
}

impl Emulator {
    /// Binds `bind` and serves in a background task of the current tokio
    /// runtime. Port 0 picks a free port, which [`Emulator::url`] returns.
    pub async fn start(bind: SocketAddr, options: EmulatorOptions) -> std::io::Result<Emulator> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(options));
        let (stop, stop_receiver) = watch::channel(false);
        let server = tokio::spawn(server::serve(listener, Arc::clone(&shared), stop_receiver));
        tracing::info!(%addr, "emulator listening");

        Ok(Emulator {
            inner: Arc::new(Inner {
                addr,
                shared,
                stop,
                server: Mutex::new(Some(server)),
                generators: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Returns the base URL, such as `http://127.0.0.1:9000`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Adds a tenant or replaces its credentials; its detections stay.
    pub fn add_tenant(&self, tenant_id: &str, spec: TenantSpec) {
        let mut state = self.inner.shared.lock();
        state.tenant_mut(tenant_id).credentials = Some(spec);
    }

    /// Registers a PEM certificate for the tenant's app, so client assertions
    /// signed with its key are accepted. Fails when `pem` contains no certificate.
    pub fn add_client_certificate(&self, tenant_id: &str, pem: &[u8]) -> Result<(), String> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem)
            .map_err(|e| format!("no PEM certificate found: {e}"))?;
        let mut state = self.inner.shared.lock();
        state.tenant_mut(tenant_id).certificates.push(der.as_ref().to_vec());
        Ok(())
    }

    /// Appends detections to a tenant. With `shift_to_now`, their `AlertTime`
    /// and `LastProcessedTimeUtc` move by one whole number of seconds so
    /// that the newest `LastProcessedTimeUtc` falls within the last second.
    pub fn load_detections(&self, tenant_id: &str, mut detections: Vec<Value>, shift_to_now: bool) {
        if shift_to_now {
            data::shift_to_now(&mut detections, chrono::Utc::now());
        }
        let stored: Vec<StoredDetection> = detections.iter().map(StoredDetection::new).collect();
        let mut state = self.inner.shared.lock();
        state.tenant_mut(tenant_id).detections.extend(stored);
    }

    /// Appends detections given as JSON texts, each served exactly as given
    /// (see [`parse_detection_texts`]), with the times they have.
    pub fn load_detection_texts(&self, tenant_id: &str, texts: &[Box<serde_json::value::RawValue>]) {
        let stored: Vec<StoredDetection> = texts.iter().map(|text| StoredDetection::from_text(text.get())).collect();
        let mut state = self.inner.shared.lock();
        state.tenant_mut(tenant_id).detections.extend(stored);
    }

    /// Appends one detection, served as its compact JSON text.
    pub fn push_detection(&self, tenant_id: &str, detection: Value) {
        let stored = StoredDetection::new(&detection);
        let mut state = self.inner.shared.lock();
        state.tenant_mut(tenant_id).detections.push(stored);
    }

    /// Adds a realistic detection processed now and returns it: a copy of
    /// one of the tenant's detections (or of a sample) with fresh ids and
    /// `AlertTime` and `LastProcessedTimeUtc` set to now, with 7 fractional digits.
    pub fn new_detection(&self, tenant_id: &str) -> Value {
        data::new_detection(&self.inner.shared, tenant_id)
    }

    /// Adds `count` synthetic detections of about `approx_bytes` of JSON
    /// each, processed at random times in the last hour, with unique `FullId`s.
    /// Only free-text fields shrink, so a detection stays above about 1.6 to
    /// 1.8 KB (the samples' fixed fields) however small the target.
    pub fn generate(&self, tenant_id: &str, count: usize, approx_bytes: usize) {
        data::generate(&self.inner.shared, tenant_id, count, approx_bytes);
    }

    /// Adds a new detection to the tenant every `every` until the emulator
    /// stops. A zero interval starts nothing. Must be called within a tokio runtime.
    pub fn spawn_generator(&self, tenant_id: &str, every: Duration) {
        if every.is_zero() {
            return;
        }
        let shared = Arc::clone(&self.inner.shared);
        let tenant_id = tenant_id.to_string();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // The first tick completes at once; the first detection comes
            // one interval after the start.
            ticks.tick().await;
            loop {
                ticks.tick().await;
                data::new_detection(&shared, &tenant_id);
            }
        });
        let mut generators = self.inner.generators.lock().unwrap_or_else(|e| e.into_inner());
        generators.push(task);
    }

    /// Queues a fault; each `/api/alerts` request takes the oldest one.
    pub fn inject_fault(&self, fault: Fault) {
        self.inner.shared.lock().faults.push_back(fault);
    }

    /// Returns every `/api/alerts` request so far, oldest first (at most the
    /// last 100 000).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.shared.lock().requests.iter().cloned().collect()
    }

    /// Returns the number of POST requests to either token endpoint, failed ones included.
    pub fn token_requests(&self) -> usize {
        self.inner.shared.lock().token_requests
    }

    /// The access tokens issued and not yet expired or revoked, so that tests
    /// can check that none of them leaks into logs.
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.shared.lock().tokens.keys().cloned().collect()
    }

    pub fn detection_count(&self, tenant_id: &str) -> usize {
        let state = self.inner.shared.lock();
        state.tenant(tenant_id).map_or(0, |tenant| tenant.detections.len())
    }

    /// Sets the lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.inner.shared.lock().options.token_lifetime = d;
    }

    /// Invalidates every issued token, so requests with them get 401.
    pub fn revoke_tokens(&self) {
        self.inner.shared.lock().tokens.clear();
    }

    /// Stops accepting connections, lets requests in flight finish (up to a
    /// grace period, then closes them) and stops the generators.
    pub async fn shutdown(self) {
        let _ = self.inner.stop.send(true);
        let generators: Vec<JoinHandle<()>> = {
            let mut generators = self.inner.generators.lock().unwrap_or_else(|e| e.into_inner());
            generators.drain(..).collect()
        };
        for generator in generators {
            generator.abort();
        }
        let server = self.inner.server.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(server) = server {
            if let Err(error) = server.await {
                tracing::warn!(%error, "emulator server task failed");
            }
        }
        tracing::info!(addr = %self.inner.addr, "emulator stopped");
    }
}
