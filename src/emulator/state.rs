//! The emulator's shared state: tenants with their credentials and
//! detections, issued tokens, the fault queue and the request log.
//!
//! One mutex guards everything. Handlers hold it only for short, synchronous
//! steps and never across an `.await`, so a slow response (the `Slow` fault)
//! never blocks other requests.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio::time::Instant;

use super::{EmulatorOptions, Fault, RecordedRequest, TenantSpec};
use crate::detection::json_value_text;
use crate::timefmt;

/// The request log keeps at most this many entries and then drops the
/// oldest, so a long-running `emulate` process does not grow without bound.
const MAX_RECORDED_REQUESTS: usize = 100_000;

pub(super) struct Shared {
    state: Mutex<State>,
}

impl Shared {
    pub(super) fn new(options: EmulatorOptions) -> Self {
        let state = State {
            options,
            tenants: HashMap::new(),
            tokens: HashMap::new(),
            faults: VecDeque::new(),
            requests: VecDeque::new(),
            alerts_requests: 0,
            token_requests: 0,
            assertion_ids: HashSet::new(),
            rng: XorShift::seeded(),
        };
        Self { state: Mutex::new(state) }
    }

    /// Locks the state. A handler that panicked while holding the lock left
    /// only plain data behind, so a poisoned lock is still usable.
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(super) struct State {
    pub options: EmulatorOptions,
    /// Tenants by lowercase id, because Azure AD tenant ids (GUIDs and
    /// domain names) are case-insensitive.
    pub tenants: HashMap<String, Tenant>,
    /// Issued access tokens by token text.
    pub tokens: HashMap<String, IssuedToken>,
    pub faults: VecDeque<Fault>,
    pub requests: VecDeque<RecordedRequest>,
    /// Count of `/api/alerts` requests, including those dropped from `requests`.
    pub alerts_requests: usize,
    pub token_requests: usize,
    /// `jti` of every accepted client assertion, to reject a replay.
    pub assertion_ids: HashSet<String>,
    pub rng: XorShift,
}

impl State {
    pub(super) fn tenant(&self, tenant_id: &str) -> Option<&Tenant> {
        self.tenants.get(&tenant_id.to_ascii_lowercase())
    }

    /// Returns the tenant, creating one without credentials if it is new.
    pub(super) fn tenant_mut(&mut self, tenant_id: &str) -> &mut Tenant {
        self.tenants.entry(tenant_id.to_ascii_lowercase()).or_insert_with(|| Tenant {
            id: tenant_id.to_string(),
            credentials: None,
            certificates: Vec::new(),
            detections: Vec::new(),
        })
    }

    pub(super) fn record(&mut self, request: RecordedRequest) {
        self.alerts_requests += 1;
        if self.requests.len() >= MAX_RECORDED_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(request);
    }

    /// Drops expired tokens, so the token map stays as small as the number
    /// of live tokens.
    pub(super) fn purge_expired_tokens(&mut self, now: Instant) {
        self.tokens.retain(|_, token| token.expires_at > now);
    }
}

pub(super) struct Tenant {
    /// The id as first given, for reports.
    pub id: String,
    /// `None` for a tenant that only has detections: no token is issued for it.
    pub credentials: Option<TenantSpec>,
    /// DER certificates registered for the app, for client assertions.
    pub certificates: Vec<Vec<u8>>,
    /// Detections in insertion order; queries sort them by time.
    pub detections: Vec<StoredDetection>,
}

pub(super) struct IssuedToken {
    /// Lowercase id of the tenant the token was issued for.
    pub tenant_key: String,
    pub expires_at: Instant,
}

/// A detection as served: its compact JSON text plus the fields the API
/// filters on, parsed once on insertion.
pub(super) struct StoredDetection {
    /// Shared, so a response can be written after the state lock is released.
    pub json: std::sync::Arc<ServedJson>,
    /// `None` when `LastProcessedTimeUtc` is missing or unparsable; such a
    /// detection never matches a time window.
    pub last_processed: Option<DateTime<Utc>>,
    pub machine_group: String,
    pub device_tags: String,
    pub cloud_tags: String,
}

impl StoredDetection {
    /// Stores `text`, one element of a JSON array, to be served exactly as
    /// given: escapes, number spelling, whitespace and lone surrogates
    /// included. The filter fields are read as the forwarder reads them,
    /// and an element that is not an object has none.
    pub(super) fn from_text(text: &str) -> Self {
        let detection = crate::detection::Detection::from_json_text(text).ok();
        let field = |name: &str| detection.as_ref().and_then(|d| d.text(name)).map(|text| text.into_owned()).unwrap_or_default();
        Self {
            json: ServedJson::new(text.into()),
            last_processed: detection.as_ref().and_then(|d| d.last_processed()),
            machine_group: field("MachineGroup"),
            device_tags: field("DeviceCreatedMachineTags"),
            cloud_tags: field("CloudCreatedMachineTags"),
        }
    }

    pub(super) fn new(detection: &Value) -> Self {
        let field =
            |name: &str| detection.get(name).and_then(json_value_text).map(|text| text.into_owned()).unwrap_or_default();
        let last_processed = timefmt::parse(&field("LastProcessedTimeUtc"));
        Self {
            json: ServedJson::new(detection.to_string().into()),
            last_processed,
            machine_group: field("MachineGroup"),
            device_tags: field("DeviceCreatedMachineTags"),
            cloud_tags: field("CloudCreatedMachineTags"),
        }
    }
}

/// A detection's JSON text as served.
pub(super) struct ServedJson {
    pub text: Box<str>,
    /// Set on the first detection of a run compressed ahead of time.
    pub run: std::sync::OnceLock<std::sync::Arc<CompressedRun>>,
}

impl ServedJson {
    fn new(text: Box<str>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self { text, run: std::sync::OnceLock::new() })
    }
}

/// Detections that are often served one after another, joined by commas and
/// compressed ahead of time. A gzip response that lists them in this order
/// copies these blocks instead of compressing the texts again on the cores
/// the forwarder runs on.
pub(super) struct CompressedRun {
    /// Weak, so the first member does not keep itself alive; a weak
    /// reference also keeps a member's address from being reused.
    pub members: Vec<std::sync::Weak<ServedJson>>,
    /// Raw deflate blocks that end on a byte boundary without a final block
    /// (a full flush), so they can be spliced into any deflate stream
    /// after another full flush.
    pub blocks: Box<[u8]>,
}

/// xorshift64* pseudo-random numbers for ids and tokens.
///
/// NOTE: not cryptographically secure, so emulator tokens are guessable.
/// That is acceptable only because the emulator guards test data.
pub(super) struct XorShift(u64);

impl XorShift {
    /// Seeds from the clock, the process id and a per-process counter, so two
    /// emulators started at the same instant still differ.
    pub(super) fn seeded() -> Self {
        static STARTED: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        let counter = STARTED.fetch_add(1, Ordering::Relaxed);
        let seed = nanos ^ u64::from(std::process::id()).rotate_left(32) ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self::from_seed(seed)
    }

    pub(super) fn from_seed(seed: u64) -> Self {
        // One splitmix64 step spreads a low-entropy seed over all 64 bits;
        // xorshift must not start at zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 1 } else { z })
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Returns a number in `0..bound`, or 0 when `bound` is 0.
    pub(super) fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 {
            0
        } else {
            self.next_u64() % bound
        }
    }

    pub(super) fn bytes(&mut self, count: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(count + 8);
        while bytes.len() < count {
            bytes.extend_from_slice(&self.next_u64().to_le_bytes());
        }
        bytes.truncate(count);
        bytes
    }

    /// Returns an id in the form of a GUID, for trace and correlation ids.
    pub(super) fn guid(&mut self) -> String {
        let b = self.bytes(16);
        let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
        format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
    }
}

const BASE64_STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Encodes base64 with padding, the form of `IocUniqueId`.
pub(super) fn base64_standard(bytes: &[u8]) -> String {
    base64(bytes, BASE64_STANDARD, true)
}

/// Encodes base64url without padding, safe in headers and URLs.
pub(super) fn base64_url(bytes: &[u8]) -> String {
    base64(bytes, BASE64_URL, false)
}

fn base64(bytes: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let group = (u32::from(chunk[0]) << 16)
            | (u32::from(chunk.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(chunk.get(2).copied().unwrap_or(0));
        let symbols = chunk.len() + 1;
        for i in 0..4 {
            if i < symbols {
                let index = (group >> (18 - 6 * i)) & 0x3F;
                out.push(char::from(alphabet[index as usize]));
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}
