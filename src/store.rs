//! The state store: checkpoints, the outbox, sink cursors and dead letters in
//! one sled database, the outbox's batches in [`crate::spool`] files, and
//! the dedupe set in [`crate::seen`] files. A single process owns it.
//!
//! # Layout (schema version 3)
//! | tree | key | value |
//! | --- | --- | --- |
//! | `meta` | `schema_version` | u32 big-endian |
//! | `checkpoints` | tenant name | RFC 3339 text with nanoseconds |
//! | `outbox` | sequence number u64 BE | index of one queued batch: spool segment, offset, length, count, and the range of its `LastProcessedTimeUtc` and its tenant (not in entries of version 2) |
//! | `cursors` | sink name | last acknowledged position, u64 BE |
//! | `dead_letters` | id u64 BE | JSON: sink, tenant, reason, time, detection, and `detection_base64` when the detection is not UTF-8 |
//! | `requeued` | sequence number u64 BE | the one sink a requeued dead letter's batch is for |
//!
//! The outbox contains one entry per queued batch (up to [`MAX_BATCH_ITEMS`]
//! detections), not one per detection, and the batch itself lives in the
//! [`crate::spool`] segment files: sled copies and serializes whole nodes on
//! every write, so detection payloads inside sled dominated run time and
//! memory. A detection's **position** is `sequence << 16 | index in batch`;
//! a sink's cursor is the position of the last detection it acknowledged, and
//! 0 means none (sequence numbers start at 1).
//!
//! Schema version 1 kept the dedupe set in sled trees named
//! `dedupe.<period>.<generation>`, keyed by tenant, 0x00, FullId. Opening
//! such a database moves their keys into the seen files, drops the trees and
//! writes version 3. Version 2 differs from 3 only in outbox entries without
//! a window, which version 3 still reads, so opening it writes the new
//! number and nothing else.
//!
//! # Why the write order is crash-safe
//! A batch's spool record is on disk before anything points at it. Then its
//! outbox index entry is written and sled is flushed, and only then are its
//! FullIds appended to the dedupe set and fsynced. A crash between the two
//! leaves detections queued but not marked as seen: the next poll may queue
//! them again, a repeat rather than a loss. A FullId is never marked as seen
//! without its detection in the outbox. The poller moves the checkpoint in
//! a last transaction only after every batch of the window is queued, so a
//! crash in between leaves the checkpoint where it was. The next poll then
//! reads the window again and the dedupe set absorbs what was already
//! queued. A sink's cursor is written only after the sink
//! acknowledged the batch, and sled recovers a prefix of its log, so a cursor
//! never survives a crash that lost the entries it points past. The only
//! repeats after a crash are batches sent but not yet acknowledged. The dead
//! letters a sink stores for a batch are written in the same transaction
//! as its cursor move past them, so neither a crash nor a retry after a
//! failed write stores a letter twice.
//!
//! # Damaged spool records
//! A batch whose spool record cannot be read back as written (see
//! [`crate::spool`]) would stop every sink at it forever. So would a record
//! that passes its CRC check but is not a valid batch with as many
//! detections as its outbox entry. [`Store::read_after`] instead moves such
//! a batch to dead letters of [`SPOOL_SINK`] with the bytes that remain,
//! deletes its outbox entry and reads on. The letters are written in the
//! transaction that deletes the entry, so each is stored once, also when a
//! write fails or the process crashes.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::Tree;

use crate::detection::Detection;
use crate::seen::{Seen, SeenError, SeenSet, TenantTag};
use crate::spool::{RecordRef, Spool, SpoolError};
use crate::timefmt;

pub const SCHEMA_VERSION: u32 = 3;
/// The version before outbox index entries recorded their batch's window.
/// Its entries still decode, so opening only writes the new number.
const SCHEMA_VERSION_NO_WINDOW: u32 = 2;
/// The version before the dedupe set moved out of sled; opening converts it.
const SCHEMA_VERSION_SLED_DEDUPE: u32 = 1;
/// The sink name of dead letters that came from the API response itself
/// (elements that are not detections); requeueing sends them to every sink.
pub const SOURCE_SINK: &str = "(source)";
/// The sink name of dead letters set aside from a damaged spool record.
/// Their text may differ from what was queued, so they cannot be requeued.
pub const SPOOL_SINK: &str = "(spool)";
const LOCK_FILE: &str = "mde-forwarder.lock";
/// Detections per outbox entry; positions reserve 16 bits for the index.
pub const MAX_BATCH_ITEMS: usize = 4096;
const INDEX_BITS: u32 = 16;
const DEDUPE_PREFIX: &str = "dedupe.";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {path} is in use by process {pid}, another mde-forwarder; stop it first or set a different [state] dir")]
    Locked { path: PathBuf, pid: String },
    #[error("cannot create state directory {path}: {source}; check that the parent exists and is writable by this user")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    #[error("cannot open the database in {path}: {source}; check permissions and free space first; if the database is damaged, move the state directory aside (keep it for a closer look) and start with an empty one: the first poll looks back initial_lookback_secs, and `state set-checkpoint --resend` replays an older window")]
    Open { path: PathBuf, source: sled::Error },
    #[error("the state directory {dir} has {found} but no database (db/), which holds the outbox index, checkpoints and sink cursors; without it the queued detections cannot be found, and the dedupe set would skip them when polled again. Restore db/ if you have it; otherwise move the state directory aside and start with an empty one, then replay the missing window with `state set-checkpoint --resend`")]
    MissingDatabase { dir: PathBuf, found: String },
    #[error("the database in {path} has schema version {found}, but this mde-forwarder reads version {SCHEMA_VERSION}; use the release that wrote it, or move the directory away to start over")]
    Schema { path: PathBuf, found: u32 },
    #[error("database in {path} failed: {source}; check free space and permissions; the operation is retried")]
    Io { path: PathBuf, source: sled::Error },
    #[error("a state store write was cancelled because the runtime is shutting down; it is retried after the next start")]
    Cancelled,
    #[error("corrupt {what} in {path}: {detail}")]
    Corrupt { path: PathBuf, what: &'static str, detail: String },
    #[error("{0}")]
    Spool(#[from] SpoolError),
    #[error("dead letter {id} is not valid UTF-8 and the sinks send text, so a requeue would change it; export its exact bytes with `state dead-letters --id {id} --raw > FILE`, then purge it")]
    RequeueNotUtf8 { id: u64 },
    #[error("dead letter {id} comes from a damaged spool record, so its text may differ from what was received; replay the detections from the API with `state set-checkpoint --resend` (the reason gives the window when it is known), then purge it")]
    RequeueDamaged { id: u64 },
    #[error("{0}; check free space and permissions; the operation is retried")]
    Seen(#[from] SeenError),
    #[error("the state directory has no sink named {0:?}; `state show` lists the sinks it has")]
    UnknownSink(String),
}

/// The sinks that have a cursor in the store but are no longer configured,
/// as [`Store::sync_cursors`] left them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UnconfiguredSinks {
    /// Sinks with nothing pending, whose cursors were deleted.
    pub released: Vec<String>,
    /// Sinks with detections pending, whose cursors stay, and how many.
    pub pending: Vec<(String, usize)>,
}

/// The detections that [`Store::drop_oldest`] deleted.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub count: usize,
    /// Earliest and latest `LastProcessedTimeUtc` of the dropped detections,
    /// when their batches recorded one.
    pub window: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// The tenants the dropped batches came from.
    pub tenants: Vec<String>,
}

/// An outbox value: where the batch is spooled, how many detections it
/// holds, and the range of their `LastProcessedTimeUtc`. The range names the
/// window to replay from the API when the spool record is lost or damaged.
#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    record: RecordRef,
    count: usize,
    /// Earliest and latest `LastProcessedTimeUtc` of the batch; `None` when
    /// no detection has one, and for entries written by schema version 2.
    window: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

/// Format byte of an index entry without a window (schema version 2).
const INDEX_FORMAT_NO_WINDOW: u8 = 3;
/// Format byte of an index entry that may carry a window.
const INDEX_FORMAT: u8 = 4;

impl IndexEntry {
    /// Indexes a record of `count` detections whose `LastProcessedTimeUtc`
    /// values, as far as they parse, are `times`.
    fn new(record: RecordRef, count: usize, times: impl Iterator<Item = DateTime<Utc>>) -> Self {
        let window = times.fold(None, |window: Option<(DateTime<Utc>, DateTime<Utc>)>, time| match window {
            None => Some((time, time)),
            Some((first, last)) => Some((first.min(time), last.max(time))),
        });
        Self { record, count, window }
    }

    /// Encodes the entry of a batch of `tenant`. The tenant is read back
    /// only by [`IndexEntry::tenant_of`], for a batch whose record is lost.
    fn encode(&self, tenant: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(52 + tenant.len());
        out.push(INDEX_FORMAT);
        out.extend_from_slice(&self.record.segment.to_be_bytes());
        out.extend_from_slice(&self.record.offset.to_be_bytes());
        out.extend_from_slice(&self.record.len.to_be_bytes());
        out.extend_from_slice(&(self.count as u32).to_be_bytes());
        match self.window {
            None => out.push(0),
            Some((first, last)) => {
                out.push(1);
                for time in [first, last] {
                    out.extend_from_slice(&time.timestamp().to_be_bytes());
                    out.extend_from_slice(&time.timestamp_subsec_nanos().to_be_bytes());
                }
            }
        }
        // Tenant names are short; a longer one is cut at a character boundary.
        let mut end = tenant.len().min(usize::from(u16::MAX));
        while !tenant.is_char_boundary(end) {
            end -= 1;
        }
        out.extend_from_slice(&(end as u16).to_be_bytes());
        out.extend_from_slice(&tenant.as_bytes()[..end]);
        out
    }

    /// Returns the tenant stored in an encoded entry; `None` for entries of
    /// schema version 2, which have none.
    fn tenant_of(bytes: &[u8]) -> Option<String> {
        let start = Self::tenant_offset(bytes)?;
        let len = usize::from(u16::from_be_bytes(bytes.get(start..start + 2)?.try_into().ok()?));
        let name = bytes.get(start + 2..start + 2 + len)?;
        String::from_utf8(name.to_vec()).ok()
    }

    /// Returns where the tenant's length starts in a format 4 entry.
    fn tenant_offset(bytes: &[u8]) -> Option<usize> {
        match (bytes.first()?, bytes.get(25)?) {
            (&INDEX_FORMAT, 0) => Some(26),
            (&INDEX_FORMAT, 1) => Some(50),
            _ => None,
        }
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let u64_at = |i: usize| bytes.get(i..i + 8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
        let u32_at = |i: usize| bytes.get(i..i + 4).and_then(|b| b.try_into().ok()).map(u32::from_be_bytes);
        let time_at = |i: usize| DateTime::from_timestamp(u64_at(i)? as i64, u32_at(i + 8)?);
        let window = match bytes.first()? {
            &INDEX_FORMAT_NO_WINDOW if bytes.len() == 25 => None,
            &INDEX_FORMAT => {
                let tenant_start = Self::tenant_offset(bytes)?;
                let tenant_len = usize::from(u16::from_be_bytes(bytes.get(tenant_start..tenant_start + 2)?.try_into().ok()?));
                if bytes.len() != tenant_start + 2 + tenant_len {
                    return None;
                }
                match bytes[25] {
                    1 => Some((time_at(26)?, time_at(38)?)),
                    _ => None,
                }
            }
            _ => return None,
        };
        let record = RecordRef { segment: u64_at(1)?, offset: u64_at(9)?, len: u32_at(17)? };
        Some(Self { record, count: u32_at(21)? as usize, window })
    }
}

/// One queued detection and who it is for.
///
/// The entries of one outbox batch share it in memory, so reading them
/// copies no detection text, and a field table one sink parses serves
/// every other sink that reads the batch.
#[derive(Clone)]
pub struct OutboxEntry {
    batch: Arc<QueuedBatch>,
    index: usize,
}

impl OutboxEntry {
    pub fn tenant(&self) -> &str {
        &self.batch.tenant
    }

    /// Set when a dead letter was requeued for one sink only.
    pub fn only_sink(&self) -> Option<&str> {
        self.batch.only_sink.as_deref()
    }

    /// Returns whether the poller checked the text to be one JSON object.
    /// Requeued dead letters are not checked, because they may be anything.
    pub fn checked(&self) -> bool {
        self.batch.checked
    }

    /// Returns the detection. Its text is not validated when the entry is
    /// not [`checked`](Self::checked), so such a detection must be checked
    /// with [`Detection::from_string`] before it is encoded.
    pub fn detection(&self) -> &Detection {
        &self.batch.detections[self.index]
    }

    /// Returns the detection's JSON text as queued.
    pub fn raw(&self) -> &str {
        self.detection().raw()
    }
}

impl std::fmt::Debug for OutboxEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxEntry")
            .field("tenant", &self.tenant())
            .field("only_sink", &self.only_sink())
            .field("checked", &self.checked())
            .field("raw", &self.raw())
            .finish()
    }
}

/// One outbox batch in memory, as queued or as read back from the spool.
struct QueuedBatch {
    tenant: String,
    only_sink: Option<String>,
    checked: bool,
    detections: Vec<Detection>,
}

/// The batches kept in memory, newest first: as many as fit in `capacity`
/// detections, and always the newest.
struct RecentBatches {
    capacity: usize,
    /// Detections in `batches`.
    detection_count: usize,
    batches: std::collections::VecDeque<(u64, Arc<QueuedBatch>)>,
}

impl RecentBatches {
    fn new(capacity: usize) -> Self {
        Self { capacity, detection_count: 0, batches: std::collections::VecDeque::new() }
    }

    fn get(&self, seq: u64) -> Option<Arc<QueuedBatch>> {
        self.batches.iter().find(|(s, _)| *s == seq).map(|(_, batch)| batch.clone())
    }

    /// Keeps `batch` as the newest. Returns the oldest ones that no longer
    /// fit, for the caller to drop after releasing the lock: freeing a
    /// batch's detections takes a while.
    #[must_use = "drop the batches pushed out after releasing the lock"]
    fn keep(&mut self, seq: u64, batch: Arc<QueuedBatch>) -> Vec<Arc<QueuedBatch>> {
        self.detection_count += batch.detections.len();
        self.batches.push_front((seq, batch));
        let mut pushed_out = Vec::new();
        while self.detection_count > self.capacity && self.batches.len() > 1 {
            if let Some((_, oldest)) = self.batches.pop_back() {
                self.detection_count -= oldest.detections.len();
                pushed_out.push(oldest);
            }
        }
        pushed_out
    }

    /// Removes the batches before sequence number `first` and returns them,
    /// for the caller to drop after releasing the lock.
    #[must_use = "drop the batches removed after releasing the lock"]
    fn drop_before(&mut self, first: u64) -> Vec<Arc<QueuedBatch>> {
        let (kept, removed): (std::collections::VecDeque<_>, std::collections::VecDeque<_>) =
            std::mem::take(&mut self.batches).into_iter().partition(|(seq, _)| *seq >= first);
        self.batches = kept;
        self.detection_count = self.batches.iter().map(|(_, batch)| batch.detections.len()).sum();
        removed.into_iter().map(|(_, batch)| batch).collect()
    }
}

/// Kept in memory: the latest batches queued, and the latest read back
/// from the spool.
///
/// Sinks that keep up with the poller find its newest batches in memory.
/// A sink that fell behind reads older batches from the spool. Those are
/// kept apart, so they never push out the batches the other sinks read
/// next. A sink that read part of a batch still finds the rest there.
struct BatchMemory {
    queued: RecentBatches,
    read: RecentBatches,
}

/// Detections of [`BatchMemory`]: 2,000 queued detections of 2 KB are about
/// 4 MB of text. Sinks that keep up stay within 2,000 detections of the
/// poller. With four batches of 250, a poller that read faster than the
/// sinks wrote pushed out batches that the sinks then read back from the
/// spool.
const QUEUED_DETECTIONS_KEPT: usize = 2000;
const READ_DETECTIONS_KEPT: usize = 500;

/// Spooled batch format of detections the poller checked.
const BATCH_CHECKED: u8 = 3;
/// Spooled batch format of detections that were not checked (requeued dead
/// letters, and every batch written before version 3 existed).
const BATCH_UNCHECKED: u8 = 2;

/// An outbox value in pieces, so the detections are written to the spool
/// without being copied into one buffer: format version, tenant, target
/// sink and count in `head`, then each detection's length and bytes. The
/// version records whether the poller checked the detections
/// ([`BATCH_CHECKED`]) or not ([`BATCH_UNCHECKED`]).
struct BatchPayload<'a> {
    head: Vec<u8>,
    lengths: Vec<[u8; 4]>,
    raws: Vec<&'a [u8]>,
}

impl<'a> BatchPayload<'a> {
    fn new(tenant: &str, only_sink: Option<&str>, checked: bool, raws: impl ExactSizeIterator<Item = &'a str>) -> Self {
        let target = only_sink.unwrap_or("");
        let mut head = Vec::with_capacity(9 + tenant.len() + target.len());
        head.push(if checked { BATCH_CHECKED } else { BATCH_UNCHECKED });
        head.extend_from_slice(&(tenant.len() as u16).to_be_bytes());
        head.extend_from_slice(tenant.as_bytes());
        head.extend_from_slice(&(target.len() as u16).to_be_bytes());
        head.extend_from_slice(target.as_bytes());
        head.extend_from_slice(&(raws.len() as u32).to_be_bytes());
        let mut lengths = Vec::with_capacity(raws.len());
        let mut bytes = Vec::with_capacity(raws.len());
        for raw in raws {
            lengths.push((raw.len() as u32).to_be_bytes());
            bytes.push(raw.as_bytes());
        }
        Self { head, lengths, raws: bytes }
    }

    fn parts(&self) -> Vec<&[u8]> {
        let mut parts = Vec::with_capacity(1 + 2 * self.raws.len());
        parts.push(self.head.as_slice());
        for (length, raw) in self.lengths.iter().zip(&self.raws) {
            parts.push(length.as_slice());
            parts.push(raw);
        }
        parts
    }
}

/// A decoded outbox value; detections are sliced out on demand.
struct BatchView<'a> {
    tenant: String,
    checked: bool,
    only_sink: Option<String>,
    count: usize,
    items: &'a [u8],
}

impl<'a> BatchView<'a> {
    /// Decodes the head of a batch, or describes why `bytes` do not start
    /// with one.
    fn decode(bytes: &'a [u8]) -> Result<Self, String> {
        let Some((&version, rest)) = bytes.split_first() else {
            return Err("the record is empty".into());
        };
        if version != BATCH_CHECKED && version != BATCH_UNCHECKED {
            return Err(format!("unknown batch format version {version}"));
        }
        let (tenant, rest) = take_string(rest).ok_or("the tenant name is cut short or not valid UTF-8")?;
        let (target, rest) = take_string(rest).ok_or("the target sink name is cut short or not valid UTF-8")?;
        let count = rest.get(..4).ok_or("the detection count is cut short")?;
        let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
        let only_sink = (!target.is_empty()).then_some(target);
        Ok(Self { tenant, checked: version == BATCH_CHECKED, only_sink, count, items: &rest[4..] })
    }

    /// Returns the detections' texts in order, or describes the first one
    /// that is cut short or not UTF-8, or the bytes left after the last.
    fn texts(&self) -> Result<Vec<&'a str>, String> {
        let mut texts = Vec::with_capacity(self.count.min(MAX_BATCH_ITEMS));
        let mut rest = self.items;
        for item in 0..self.count {
            let cut = || format!("detection {item} of {} is cut short", self.count);
            let len = rest.get(..4).ok_or_else(cut)?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let bytes = rest.get(4..).and_then(|text| text.get(..len)).ok_or_else(cut)?;
            let text = std::str::from_utf8(bytes)
                .map_err(|e| format!("detection {item} of {} is not valid UTF-8 ({e})", self.count))?;
            texts.push(text);
            rest = &rest[4 + len..];
        }
        match rest.len() {
            0 => Ok(texts),
            1 => Err("1 byte follows the last detection".into()),
            left => Err(format!("{left} bytes follow the last detection")),
        }
    }
}

impl<'a> BatchView<'a> {
    /// Returns the texts that can still be read from a damaged batch, in
    /// order: those before the first one cut short, except those that are
    /// not UTF-8. The count may be the damaged part, so only the bytes
    /// bound the reading.
    fn readable_texts(&self) -> Vec<&'a str> {
        let mut texts = Vec::new();
        let mut rest = self.items;
        while !rest.is_empty() {
            let Some(len) = rest.get(..4) else { break };
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let Some(bytes) = rest.get(4..).and_then(|text| text.get(..len)) else { break };
            if let Ok(text) = std::str::from_utf8(bytes) {
                texts.push(text);
            }
            rest = &rest[4 + len..];
        }
        texts
    }
}

/// Decodes a spooled batch of `count` detections, or describes why the
/// bytes are not one.
fn decode_batch(payload: &[u8], count: usize) -> Result<QueuedBatch, String> {
    let view = BatchView::decode(payload)?;
    if view.count != count {
        return Err(format!("the batch holds {} detections, the outbox index {count}", view.count));
    }
    let detections = view.texts()?.into_iter().map(|text| Detection::from_checked_string(text.to_string())).collect();
    Ok(QueuedBatch { tenant: view.tenant, only_sink: view.only_sink, checked: view.checked, detections })
}

fn take_string(bytes: &[u8]) -> Option<(String, &[u8])> {
    let len = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]) as usize;
    let text = bytes.get(2..2 + len)?;
    Some((std::str::from_utf8(text).ok()?.to_string(), &bytes[2 + len..]))
}

fn position(seq: u64, index: usize) -> u64 {
    (seq << INDEX_BITS) | index as u64
}

/// Splits a position into its batch's sequence number and its index in the batch.
pub fn split_position(position: u64) -> (u64, usize) {
    (position >> INDEX_BITS, (position & ((1 << INDEX_BITS) - 1)) as usize)
}

/// Counts of one [`Store::enqueue`]: detections queued and duplicates skipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EnqueueOutcome {
    pub queued: usize,
    pub duplicates: usize,
}

/// A detection a sink rejected for good, kept with the reason.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeadLetter {
    #[serde(skip)]
    pub id: u64,
    pub sink: String,
    pub tenant: String,
    pub reason: String,
    pub time: String,
    /// The detection's text. When its bytes are not UTF-8, a copy for
    /// display with U+FFFD in place of each invalid sequence; the exact
    /// bytes are then in `detection_base64`.
    pub detection: String,
    /// The detection's exact bytes in standard padded base64, present only
    /// when they are not UTF-8. Letters stored before this field existed
    /// are all UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection_base64: Option<String>,
}

impl DeadLetter {
    fn new(sink: &str, tenant: &str, raw: &[u8], reason: &str) -> Self {
        let (detection, detection_base64) = match std::str::from_utf8(raw) {
            Ok(text) => (text.to_string(), None),
            Err(_) => (String::from_utf8_lossy(raw).into_owned(), Some(BASE64.encode(raw))),
        };
        Self {
            id: 0,
            sink: sink.to_string(),
            tenant: tenant.to_string(),
            reason: reason.to_string(),
            time: timefmt::format_exact(Utc::now()),
            detection,
            detection_base64,
        }
    }

    /// Returns whether the detection is valid UTF-8, so that `detection`
    /// is its exact text.
    pub fn is_utf8(&self) -> bool {
        self.detection_base64.is_none()
    }

    /// Returns the detection's exact bytes. [`Store::dead_letters`] checks
    /// the base64 when it reads a letter, so an error here means a letter
    /// built or changed elsewhere.
    pub fn detection_bytes(&self) -> Result<std::borrow::Cow<'_, [u8]>, base64::DecodeError> {
        match &self.detection_base64 {
            None => Ok(std::borrow::Cow::Borrowed(self.detection.as_bytes())),
            Some(encoded) => BASE64.decode(encoded).map(std::borrow::Cow::Owned),
        }
    }
}

/// Settings fixed when the store opens.
#[derive(Debug, Clone, Copy)]
pub struct StoreOptions {
    /// How long a FullId is remembered, in seconds.
    pub dedupe_retention_secs: u64,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// Size at which a spool segment file is closed.
    pub spool_segment_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            dedupe_retention_secs: 7 * 24 * 3600,
            cache_bytes: 2 * 1024 * 1024,
            spool_segment_bytes: crate::spool::SEGMENT_BYTES,
        }
    }
}

pub struct Store {
    db: sled::Db,
    dir: PathBuf,
    checkpoints: Tree,
    outbox: Tree,
    cursors: Tree,
    dead_letters: Tree,
    /// The batches of requeued dead letters that are for one sink, so
    /// `pending` can tell without reading them from the spool.
    requeued: Tree,
    spool: Spool,
    /// Batches kept in memory for the sinks: each sink reads a batch in
    /// `batch_size` slices, and every sink reads the same batches.
    recent: std::sync::Mutex<BatchMemory>,
    /// Held from a spool append to its index insert, so sequence numbers
    /// follow spool order. Release relies on it: segments before the first
    /// remaining batch's segment are deleted, which is only safe when no
    /// later batch lives in an earlier segment.
    append_order: std::sync::Mutex<()>,
    outbox_bytes: AtomicU64,
    seen: SeenSet,
    /// One lock per tenant, held for a whole enqueue.
    tenant_locks: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<std::sync::Mutex<()>>>>,
    /// Makes the next cursor write, or the next removal of a damaged
    /// batch, fail as a full disk would.
    #[cfg(test)]
    fail_next_write: std::sync::atomic::AtomicBool,
    _lock: File,
}

impl Store {
    /// Opens (or creates, mode 0700) the state directory and takes its lock.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreOptions::default())
    }

    pub fn open_with(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        create_private_dir(dir)?;
        let lock = lock_dir(dir)?;
        let db_path = dir.join("db");
        // sled keeps its log in the file `db` of its directory: without
        // it, sled starts an empty database (also when db/ is empty).
        if !db_path.join("db").exists() {
            check_no_orphans(dir)?;
        }
        let db = sled::Config::new()
            .path(&db_path)
            .cache_capacity(options.cache_bytes)
            // Every write that matters is flushed explicitly; sled's own
            // flusher thread would only wake the process between polls.
            .flush_every_ms(None)
            .open()
            .map_err(|source| StoreError::Open { path: db_path.clone(), source })?;
        let io = |source| StoreError::Io { path: db_path.clone(), source };
        let meta = db.open_tree("meta").map_err(io)?;
        let version = check_schema(&meta, &db, &db_path)?;
        let spool = Spool::open_with(&dir.join("spool"), options.spool_segment_bytes)?;
        let seen = SeenSet::open(&dir.join("seen"), (options.dedupe_retention_secs / 2).max(1))?;
        if version == SCHEMA_VERSION_SLED_DEDUPE {
            let converted = migrate_sled_dedupe(&db, &seen, &db_path)?;
            tracing::warn!(
                path = %db_path.display(),
                converted,
                "converted the state directory from schema version 1 to 3: the dedupe set moved into seen/ files, and releases before this one can no longer open the directory"
            );
        }
        if version == SCHEMA_VERSION_NO_WINDOW {
            tracing::warn!(
                path = %db_path.display(),
                "upgraded the state directory from schema version 2 to 3: new outbox entries record their LastProcessedTimeUtc range, and releases before this one can no longer open the directory"
            );
        }
        if version != SCHEMA_VERSION {
            meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes()).map_err(io)?;
            db.flush().map_err(io)?;
        }
        let store = Self {
            spool,
            recent: std::sync::Mutex::new(BatchMemory {
                queued: RecentBatches::new(QUEUED_DETECTIONS_KEPT),
                read: RecentBatches::new(READ_DETECTIONS_KEPT),
            }),
            append_order: std::sync::Mutex::new(()),
            checkpoints: db.open_tree("checkpoints").map_err(io)?,
            outbox: db.open_tree("outbox").map_err(io)?,
            cursors: db.open_tree("cursors").map_err(io)?,
            dead_letters: db.open_tree("dead_letters").map_err(io)?,
            requeued: db.open_tree("requeued").map_err(io)?,
            dir: db_path,
            db,
            outbox_bytes: AtomicU64::new(0),
            seen,
            tenant_locks: std::sync::Mutex::default(),
            #[cfg(test)]
            fail_next_write: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        };
        let bytes = store
            .outbox
            .iter()
            .values()
            .filter_map(Result::ok)
            .filter_map(|v| IndexEntry::decode(&v))
            .map(|e| e.record.len as u64)
            .sum();
        store.outbox_bytes.store(bytes, Ordering::Relaxed);
        Ok(store)
    }

    /// Returns the database path, for messages.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn io(&self, source: sled::Error) -> StoreError {
        StoreError::Io { path: self.dir.clone(), source }
    }

    fn corrupt(&self, what: &'static str, detail: String) -> StoreError {
        StoreError::Corrupt { path: self.dir.clone(), what, detail }
    }

    pub fn checkpoint(&self, tenant: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let Some(bytes) = self.checkpoints.get(tenant).map_err(|e| self.io(e))? else {
            return Ok(None);
        };
        let text = String::from_utf8_lossy(&bytes);
        timefmt::parse(&text)
            .map(Some)
            .ok_or_else(|| self.corrupt("checkpoint", format!("tenant {tenant}: {text:?}")))
    }

    /// Sets or clears a tenant's checkpoint (operator command), then flushes.
    pub fn set_checkpoint(&self, tenant: &str, time: Option<DateTime<Utc>>) -> Result<(), StoreError> {
        match time {
            Some(t) => self.checkpoints.insert(tenant, timefmt::format_exact(t).as_bytes()),
            None => self.checkpoints.remove(tenant),
        }
        .map_err(|e| self.io(e))?;
        self.db.flush().map_err(|e| self.io(e))?;
        Ok(())
    }

    /// Returns all checkpoints, by tenant name.
    pub fn checkpoints(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.checkpoints
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(|e| self.io(e))?;
                Ok((String::from_utf8_lossy(&k).into_owned(), String::from_utf8_lossy(&v).into_owned()))
            })
            .collect()
    }

    /// Queues the detections not seen before, moves the checkpoint forward to
    /// `checkpoint` (never back), flushes, and then records the detections as
    /// seen (see the module documentation for why in this order).
    pub async fn enqueue(
        &self,
        tenant: &str,
        detections: Vec<Detection>,
        checkpoint: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<EnqueueOutcome, StoreError> {
        // The flush and the fsyncs block this thread for a moment; the
        // poller queues its batches through `enqueue_blocking` instead.
        self.enqueue_blocking(tenant, detections, checkpoint, now)
    }

    /// Like [`Store::enqueue`], for a thread that may block: the spool's
    /// fsync and sled's flush run on the calling thread.
    ///
    /// Calls for one tenant run one at a time, so each decides what is new
    /// after the previous one added its FullIds to the dedupe set. A batch
    /// left running by a poller that was stopped or reloaded thus never
    /// races its successor into queuing the same detections twice.
    pub fn enqueue_blocking(
        &self,
        tenant: &str,
        detections: Vec<Detection>,
        checkpoint: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<EnqueueOutcome, StoreError> {
        let tenant_lock = self.tenant_lock(tenant);
        let _queuing = tenant_lock.lock().unwrap_or_else(|e| e.into_inner());
        let (outcome, fresh) = self.enqueue_unflushed(tenant, detections, checkpoint, now)?;
        self.db.flush().map_err(|e| self.io(e))?;
        self.seen.insert(&fresh, now)?;
        Ok(outcome)
    }

    fn tenant_lock(&self, tenant: &str) -> std::sync::Arc<std::sync::Mutex<()>> {
        let mut locks = self.tenant_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(tenant.to_string()).or_default().clone()
    }

    /// Spools and indexes the detections not seen before; returns the counts
    /// and the digests to add to the dedupe set once sled is flushed.
    fn enqueue_unflushed(
        &self,
        tenant: &str,
        detections: Vec<Detection>,
        checkpoint: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(EnqueueOutcome, Vec<Seen>), StoreError> {
        let mut outcome = EnqueueOutcome::default();
        let mut fresh = HashSet::with_capacity(detections.len());
        let mut added_bytes = 0u64;
        // Chunks of at most MAX_BATCH_ITEMS. An empty call still runs one
        // chunk, because that chunk moves the checkpoint.
        let mut chunk = detections;
        loop {
            let rest = chunk.split_off(chunk.len().min(MAX_BATCH_ITEMS));
            let last_chunk = rest.is_empty();
            let (chunk_outcome, bytes) = self.enqueue_chunk(tenant, chunk, checkpoint.filter(|_| last_chunk), now, &mut fresh)?;
            outcome.queued += chunk_outcome.queued;
            outcome.duplicates += chunk_outcome.duplicates;
            added_bytes += bytes;
            if last_chunk {
                break;
            }
            chunk = rest;
        }
        self.outbox_bytes.fetch_add(added_bytes, Ordering::Relaxed);
        Ok((outcome, fresh.into_iter().collect()))
    }

    /// Queues one chunk and adds the digests of its new detections to
    /// `fresh_seen`. That set already contains the earlier chunks' digests of
    /// the same call, and the caller adds it to the dedupe set after the flush.
    fn enqueue_chunk(
        &self,
        tenant: &str,
        detections: Vec<Detection>,
        checkpoint: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        fresh_seen: &mut HashSet<Seen>,
    ) -> Result<(EnqueueOutcome, u64), StoreError> {
        // The caller holds this tenant's queuing lock, so what is new can be
        // decided before anything is written.
        let mut outcome = EnqueueOutcome::default();
        let mut fresh = Vec::with_capacity(detections.len());
        let tag = TenantTag::of(tenant.as_bytes());
        for detection in detections {
            let seen = Seen::of_tenant_key(tag, &dedupe_key(tenant, &detection));
            if fresh_seen.contains(&seen) || self.seen.contains(&seen, now) {
                outcome.duplicates += 1;
                continue;
            }
            fresh_seen.insert(seen);
            fresh.push(detection);
        }
        outcome.queued = fresh.len();
        let order = self.append_order.lock().unwrap_or_else(|e| e.into_inner());
        let index = if fresh.is_empty() {
            None
        } else {
            let payload = BatchPayload::new(tenant, None, true, fresh.iter().map(Detection::raw));
            let record = self.spool.append_parts(&payload.parts())?;
            Some(IndexEntry::new(record, fresh.len(), fresh.iter().filter_map(Detection::last_processed)))
        };
        let queued_seq = std::cell::Cell::new(None);
        let trees = (&self.outbox, &self.checkpoints);
        let result = trees.transaction(|(outbox, checkpoints)| {
            if let Some(index) = index {
                // Sequence numbers start at 1: position 0 means nothing acknowledged.
                let seq = outbox.generate_id()? + 1;
                outbox.insert(&seq.to_be_bytes(), index.encode(tenant))?;
                queued_seq.set(Some(seq));
            }
            if let Some(new) = checkpoint {
                let stored = checkpoints.get(tenant)?.and_then(|b| timefmt::parse(&String::from_utf8_lossy(&b)));
                if stored.map_or(true, |c| new > c) {
                    checkpoints.insert(tenant, timefmt::format_exact(new).as_bytes())?;
                }
            }
            Ok::<_, ConflictableTransactionError<()>>(())
        });
        result.map_err(|e| self.transaction_error(e))?;
        if let Some(seq) = queued_seq.get() {
            let batch = QueuedBatch { tenant: tenant.to_string(), only_sink: None, checked: true, detections: fresh };
            // The guard of `recent` is a temporary of this statement.
            let pushed_out = self.recent.lock().unwrap_or_else(|e| e.into_inner()).queued.keep(seq, Arc::new(batch));
            drop(order);
            drop(pushed_out);
        }
        Ok((outcome, index.map_or(0, |i| i.record.len as u64)))
    }

    /// Returns an outbox batch from memory, or reads it from the spool and
    /// keeps it in memory for the other sinks.
    ///
    /// The spool is read without the lock held, so a sink reading from disk
    /// never holds up the poller's queuing, which takes the lock too.
    ///
    /// Returns [`SpoolError::Damaged`] also for a record that passes its CRC
    /// check but is not a valid batch of the index's size, because reading
    /// it again cannot help either.
    fn queued_batch(&self, seq: u64, index: IndexEntry) -> Result<Arc<QueuedBatch>, StoreError> {
        let remembered = |recent: &BatchMemory| recent.queued.get(seq).or_else(|| recent.read.get(seq));
        if let Some(batch) = remembered(&self.recent.lock().unwrap_or_else(|e| e.into_inner())) {
            return Ok(batch);
        }
        let payload = self.spool.read(index.record)?;
        let batch = decode_batch(&payload, index.count).map_err(|detail| SpoolError::Damaged {
            path: self.spool.segment_path(index.record.segment),
            offset: index.record.offset,
            detail: format!("its CRC matches, but it is not a valid outbox batch: {detail}"),
        })?;
        let batch = Arc::new(batch);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        // Another sink may have read the same batch meanwhile.
        if let Some(kept) = remembered(&recent) {
            return Ok(kept);
        }
        let pushed_out = recent.read.keep(seq, batch.clone());
        drop(recent);
        drop(pushed_out);
        Ok(batch)
    }

    /// Drops the batches kept in memory that no sink reads any more, for a
    /// sink that has caught up and paused. When every sink has everything,
    /// that is all of them. Otherwise the batches from the slowest cursor's
    /// batch on stay. When the cursors cannot be read, nothing is dropped.
    pub fn forget_delivered_batches(&self) {
        let Ok(cursors) = self.cursors() else { return };
        let Ok(last) = self.last_seq() else { return };
        let slowest = cursors.iter().map(|(_, position)| *position).min().unwrap_or(last);
        let first_needed = if slowest >= last { u64::MAX } else { split_position(slowest).0 };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = recent.queued.drop_before(first_needed);
        removed.extend(recent.read.drop_before(first_needed));
        drop(recent);
        drop(removed);
    }

    fn index_entry(&self, seq: u64, value: &[u8]) -> Result<IndexEntry, StoreError> {
        IndexEntry::decode(value).ok_or_else(|| self.corrupt("outbox entry", format!("sequence {seq}")))
    }

    /// Up to `max` detections after position `after`, with their positions.
    /// A batch whose spool record is damaged is moved to dead letters (see
    /// [`Store::set_aside_damaged`]) and skipped.
    pub fn read_after(&self, after: u64, max: usize) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let (first_seq, first_index) = split_position(after);
        let mut batch = Vec::with_capacity(max.min(1024));
        for item in self.outbox.range(first_seq.to_be_bytes()..) {
            let (key, value) = item.map_err(|e| self.io(e))?;
            let seq = seq_from(&key);
            let index = self.index_entry(seq, &value)?;
            let skip = if seq == first_seq { first_index + 1 } else { 0 };
            if skip >= index.count {
                continue;
            }
            let queued = match self.queued_batch(seq, index) {
                Ok(queued) => queued,
                Err(StoreError::Spool(damage @ SpoolError::Damaged { .. })) => {
                    self.set_aside_damaged(seq, &value, index, &damage)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            for index in skip..queued.detections.len() {
                batch.push((position(seq, index), OutboxEntry { batch: queued.clone(), index }));
                if batch.len() >= max {
                    return Ok(batch);
                }
            }
        }
        Ok(batch)
    }

    /// Moves the batch `seq`, whose spool record is damaged, to dead letters
    /// of [`SPOOL_SINK`] and deletes its outbox entry, so the sinks read on.
    ///
    /// When the bytes that remain still split into the batch's detections,
    /// each becomes a letter of its own, so `state dead-letters` lists their
    /// FullIds. Otherwise one letter keeps all of them. Either way the
    /// letters keep the bytes exactly as read. Nothing happens when the
    /// entry is gone or changed meanwhile (another sink set it aside first,
    /// or every sink acknowledged it).
    fn set_aside_damaged(&self, seq: u64, value: &[u8], index: IndexEntry, damage: &SpoolError) -> Result<(), StoreError> {
        // Release deletes entries and segments under this lock, and other
        // sinks may reach the same batch.
        let _order = self.append_order.lock().unwrap_or_else(|e| e.into_inner());
        if self.outbox.get(seq.to_be_bytes()).map_err(|e| self.io(e))?.as_deref() != Some(value) {
            return Ok(());
        }
        let bytes = self.spool.read_damaged(index.record)?;
        let (tenant, letters) = self.damaged_batch_letters(seq, value, &bytes, damage)?;

        // One transaction, so a failed write or a crash never leaves the
        // letters stored while the batch stays queued to be set aside again.
        let trees = (&self.dead_letters, &self.outbox, &self.requeued);
        let result = trees.transaction(|(dead_letters, outbox, requeued)| {
            if outbox.get(&seq.to_be_bytes())?.as_deref() != Some(value) {
                return Ok(None);
            }
            outbox.remove(&seq.to_be_bytes())?;
            requeued.remove(&seq.to_be_bytes())?;
            let mut ids = Vec::with_capacity(letters.len());
            for letter in &letters {
                let id = dead_letters.generate_id()?;
                dead_letters.insert(&id.to_be_bytes(), letter.as_slice())?;
                ids.push(id);
            }
            self.injected_write_failure()?;
            Ok::<_, ConflictableTransactionError<()>>(Some(ids))
        });
        let Some(ids) = result.map_err(|e| self.transaction_error(e))? else {
            // Removed or changed since the check above, and the
            // transaction wrote nothing.
            return Ok(());
        };
        // Reported before the flush: the batch is set aside from here on,
        // and a failed flush must not make it vanish without a word.
        self.outbox_bytes.fetch_sub(u64::from(index.record.len).min(self.outbox_bytes()), Ordering::Relaxed);
        crate::telemetry::global().metrics.add(&crate::telemetry::SPOOL_DAMAGED, &[], 1.0);
        tracing::error!(
            tenant = %tenant,
            batch = seq,
            detections = index.count,
            dead_letters = %listed_ids(&ids),
            error = %damage,
            "damaged spool record: its batch moved to dead letters and the sinks skip it; see `state dead-letters`"
        );
        self.db.flush().map_err(|e| self.io(e))?;
        Ok(())
    }

    /// Builds the dead letters of [`SPOOL_SINK`] for the readable bytes of
    /// the damaged batch `seq` (see [`Store::set_aside_damaged`]), encoded
    /// for the `dead_letters` tree, and returns them with the batch's tenant.
    fn damaged_batch_letters(&self, seq: u64, value: &[u8], bytes: &[u8], damage: &SpoolError) -> Result<(String, Vec<Vec<u8>>), StoreError> {
        let index = self.index_entry(seq, value)?;
        let target = self.requeued.get(seq.to_be_bytes()).map_err(|e| self.io(e))?;
        let target = target.map(|sink| format!(", a requeued dead letter for sink {}", String::from_utf8_lossy(&sink)));
        let origin = format!("outbox batch {seq} ({} detections{}): {damage}", index.count, target.unwrap_or_default());
        let split = BatchView::decode(bytes).ok().and_then(|view| {
            let raws = view.texts().ok();
            raws.filter(|raws| raws.len() == index.count).map(|raws| (view.tenant, raws))
        });

        match split {
            Some((tenant, raws)) => {
                let window = replay_window(&index, &raws);
                let mut letters = Vec::with_capacity(raws.len());
                for (item, raw) in raws.iter().enumerate() {
                    let reason = format!("damaged spool record, so this text may differ from what was received; detection {item} of {origin}{window}");
                    letters.push(self.encode_dead_letter(&DeadLetter::new(SPOOL_SINK, &tenant, raw.as_bytes(), &reason))?);
                }
                Ok((tenant, letters))
            }
            None => {
                let view = BatchView::decode(bytes).ok();
                let tenant = view
                    .as_ref()
                    .map(|view| view.tenant.clone())
                    .or_else(|| IndexEntry::tenant_of(value))
                    .unwrap_or_else(|| "(unknown)".to_string());
                // The detections that still read give the window to replay.
                let readable = view.map(|view| view.readable_texts()).unwrap_or_default();
                let window = replay_window(&index, &readable);
                let reason = format!(
                    "damaged spool record; this letter keeps the {} bytes that could be read, in the spool's batch format, not one detection; {origin}{window}",
                    bytes.len()
                );
                let letter = self.encode_dead_letter(&DeadLetter::new(SPOOL_SINK, &tenant, bytes, &reason))?;
                Ok((tenant, vec![letter]))
            }
        }
    }

    /// Returns the position of the last detection in the outbox, 0 when it is empty.
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let Some((key, value)) = self.outbox.last().map_err(|e| self.io(e))? else {
            return Ok(0);
        };
        let seq = seq_from(&key);
        let count = self.index_entry(seq, &value)?.count.max(1);
        Ok(position(seq, count - 1))
    }

    pub fn outbox_bytes(&self) -> u64 {
        self.outbox_bytes.load(Ordering::Relaxed)
    }

    pub fn cursor(&self, sink: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.cursors.get(sink).map_err(|e| self.io(e))?.map(|v| seq_from(&v)))
    }

    /// Records that `sink` acknowledged everything up to position `seq`.
    pub fn set_cursor(&self, sink: &str, seq: u64) -> Result<(), StoreError> {
        self.injected_write_failure().map_err(|e| self.io(e))?;
        self.cursors.insert(sink, &seq.to_be_bytes()).map_err(|e| self.io(e))?;
        Ok(())
    }
    /// Records that `sink` acknowledged everything up to `seq`, deletes what
    /// every sink has acknowledged, and flushes, so that after a crash only
    /// the batch in flight is sent again.
    pub async fn ack(&self, sink: &str, seq: u64) -> Result<usize, StoreError> {
        self.set_cursor(sink, seq)?;
        let released = self.release()?;
        self.flush().await?;
        Ok(released)
    }

    /// Stores `rejected` (entries with the reason each was rejected for
    /// good) as dead letters of `sink` and moves its cursor to `position`,
    /// in one transaction. Then it releases and flushes like [`Store::ack`].
    ///
    /// The letters and the cursor are stored together or not at all, also
    /// across a crash, so a sink that retries after a failure never stores
    /// a letter twice.
    pub async fn ack_with_dead_letters(&self, sink: &str, position: u64, rejected: &[(&OutboxEntry, &str)]) -> Result<usize, StoreError> {
        if rejected.is_empty() {
            return self.ack(sink, position).await;
        }
        let letters = rejected
            .iter()
            .map(|(entry, reason)| self.encode_dead_letter(&DeadLetter::new(sink, entry.tenant(), entry.raw().as_bytes(), reason)))
            .collect::<Result<Vec<_>, _>>()?;
        let trees = (&self.dead_letters, &self.cursors);
        let result = trees.transaction(|(dead_letters, cursors)| {
            for letter in &letters {
                let id = dead_letters.generate_id()?;
                dead_letters.insert(&id.to_be_bytes(), letter.as_slice())?;
            }
            self.injected_write_failure()?;
            cursors.insert(sink, &position.to_be_bytes())?;
            Ok::<_, ConflictableTransactionError<()>>(())
        });
        result.map_err(|e| self.transaction_error(e))?;
        let released = self.release()?;
        self.flush().await?;
        Ok(released)
    }

    fn transaction_error(&self, error: TransactionError<()>) -> StoreError {
        match error {
            TransactionError::Storage(source) => self.io(source),
            TransactionError::Abort(()) => self.io(sled::Error::Unsupported("transaction aborted".into())),
        }
    }

    /// Makes the next cursor write, or the next removal of a damaged
    /// batch, fail with an I/O error.
    #[cfg(test)]
    pub(crate) fn fail_next_write(&self) {
        self.fail_next_write.store(true, Ordering::SeqCst);
    }

    /// Returns the failure that [`Store::fail_next_write`] requested, once.
    fn injected_write_failure(&self) -> Result<(), sled::Error> {
        #[cfg(test)]
        if self.fail_next_write.swap(false, Ordering::SeqCst) {
            return Err(sled::Error::Io(std::io::Error::other("write failed on purpose (test)")));
        }
        Ok(())
    }

    /// Makes the cursors match the configured sinks. A new sink starts at the
    /// end of the outbox. The cursor of a sink that is no longer configured
    /// is deleted only when it has nothing pending. Otherwise it stays, and
    /// its detections stay queued until a sink of that name is configured
    /// again or [`Store::drop_sink`] drops them. A renamed sink is a new one
    /// to the store, so releasing the old name's backlog would lose it.
    pub fn sync_cursors(&self, sinks: &[&str]) -> Result<UnconfiguredSinks, StoreError> {
        let end = self.last_seq()?;
        for sink in sinks {
            if self.cursor(sink)?.is_none() {
                self.set_cursor(sink, end)?;
            }
        }
        let mut unconfigured = UnconfiguredSinks::default();
        for (name, _) in self.cursors()? {
            if sinks.contains(&name.as_str()) {
                continue;
            }
            match self.pending(&name)?.0 {
                0 => {
                    self.cursors.remove(name.as_bytes()).map_err(|e| self.io(e))?;
                    unconfigured.released.push(name);
                }
                pending => unconfigured.pending.push((name, pending)),
            }
        }
        self.release()?;
        Ok(unconfigured)
    }

    /// Deletes the cursor of `sink`, a sink that is no longer configured,
    /// and releases what only it held. Returns how many detections were
    /// pending for it.
    pub fn drop_sink(&self, sink: &str) -> Result<usize, StoreError> {
        if self.cursor(sink)?.is_none() {
            return Err(StoreError::UnknownSink(sink.to_string()));
        }
        let (pending, _) = self.pending(sink)?;
        self.cursors.remove(sink.as_bytes()).map_err(|e| self.io(e))?;
        self.release()?;
        self.db.flush().map_err(|e| self.io(e))?;
        Ok(pending)
    }

    /// Returns the configured sinks' cursors, lowest first.
    pub fn cursors(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut all: Vec<(String, u64)> = self
            .cursors
            .iter()
            .map(|item| item.map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), seq_from(&v))))
            .collect::<Result<_, _>>()
            .map_err(|e| self.io(e))?;
        all.sort_by_key(|(_, seq)| *seq);
        Ok(all)
    }

    /// Deletes the outbox entries every sink has acknowledged.
    pub fn release(&self) -> Result<usize, StoreError> {
        let Some(min) = self.cursors()?.first().map(|(_, seq)| *seq) else {
            return Ok(0);
        };
        let (min_seq, min_index) = split_position(min);
        let mut removed = 0;
        let mut freed = 0u64;
        let mut batch = sled::Batch::default();
        for item in self.outbox.range(..=min_seq.to_be_bytes()) {
            let (key, value) = item.map_err(|e| self.io(e))?;
            let index = self.index_entry(seq_from(&key), &value)?;
            if seq_from(&key) < min_seq || index.count <= min_index + 1 {
                freed += index.record.len as u64;
                batch.remove(key);
                removed += 1;
            }
        }
        self.apply_removal(batch, removed, freed)
    }

    fn apply_removal(&self, batch: sled::Batch, removed: usize, freed: u64) -> Result<usize, StoreError> {
        if removed > 0 {
            self.outbox.apply_batch(batch).map_err(|e| self.io(e))?;
            self.outbox_bytes.fetch_sub(freed.min(self.outbox_bytes()), Ordering::Relaxed);
            // Segments before the oldest remaining batch hold nothing queued,
            // provided no batch is between its spool append and its index
            // insert: that one may sit in an older segment than the oldest
            // indexed batch, or be the only one when the index is empty.
            let _order = self.append_order.lock().unwrap_or_else(|e| e.into_inner());
            let (oldest_seq, oldest_segment) = match self.outbox.first().map_err(|e| self.io(e))? {
                Some((key, value)) => (seq_from(&key), self.index_entry(seq_from(&key), &value)?.record.segment),
                None => (u64::MAX, u64::MAX),
            };
            if self.spool.has_segments_below(oldest_segment) {
                // The removed entries must be gone on disk before their
                // records are. Otherwise sled could bring them back after a
                // crash, and every sink would find a missing segment and
                // dead-letter detections it had already delivered.
                self.db.flush().map_err(|e| self.io(e))?;
            }
            self.spool.remove_below(oldest_segment)?;
            for key in self.requeued.range(..oldest_seq.to_be_bytes()).keys() {
                self.requeued.remove(key.map_err(|e| self.io(e))?).map_err(|e| self.io(e))?;
            }
        }
        Ok(removed)
    }

    /// Deletes the oldest entries until the outbox is under `limit` bytes,
    /// for the `drop_oldest` policy. Returns what was dropped, for a replay.
    pub fn drop_oldest(&self, limit: u64) -> Result<Dropped, StoreError> {
        let mut size = self.outbox_bytes();
        let mut dropped = Dropped::default();
        let mut removed = 0;
        let mut freed = 0;
        let mut batch = sled::Batch::default();
        for item in self.outbox.iter() {
            if size < limit {
                break;
            }
            let (key, value) = item.map_err(|e| self.io(e))?;
            let index = self.index_entry(seq_from(&key), &value)?;
            size = size.saturating_sub(index.record.len as u64);
            freed += index.record.len as u64;
            dropped.count += index.count;
            if let Some((first, last)) = index.window {
                let (from, to) = dropped.window.get_or_insert((first, last));
                *from = (*from).min(first);
                *to = (*to).max(last);
            }
            if let Some(tenant) = IndexEntry::tenant_of(&value) {
                if !dropped.tenants.contains(&tenant) {
                    dropped.tenants.push(tenant);
                }
            }
            batch.remove(key);
            removed += 1;
        }
        self.apply_removal(batch, removed, freed)?;
        Ok(dropped)
    }

    /// Detections waiting for `sink` and the position of its oldest one.
    /// A requeued dead letter for another sink does not count.
    pub fn pending(&self, sink: &str) -> Result<(usize, Option<u64>), StoreError> {
        let (first_seq, first_index) = split_position(self.cursor(sink)?.unwrap_or(0));
        let mut for_other_sinks = HashSet::new();
        for item in self.requeued.range(first_seq.to_be_bytes()..) {
            let (key, target) = item.map_err(|e| self.io(e))?;
            if &*target != sink.as_bytes() {
                for_other_sinks.insert(seq_from(&key));
            }
        }
        let mut count = 0;
        let mut oldest = None;
        for item in self.outbox.range(first_seq.to_be_bytes()..) {
            let (key, value) = item.map_err(|e| self.io(e))?;
            let seq = seq_from(&key);
            if for_other_sinks.contains(&seq) {
                continue;
            }
            let total = self.index_entry(seq, &value)?.count;
            let skip = if seq == first_seq { first_index + 1 } else { 0 };
            if total > skip {
                oldest.get_or_insert(position(seq, skip));
                count += total - skip;
            }
        }
        Ok((count, oldest))
    }

    /// FullIds remembered in the live generations.
    pub fn dedupe_len(&self) -> usize {
        self.seen.len(Utc::now())
    }

    /// Keeps a response element that is not a detection as a dead letter of
    /// [`SOURCE_SINK`], once per dedupe retention: the overlap reads it again
    /// on later polls. Returns true when it was new and is now stored.
    ///
    /// The dead letter is flushed before the element is marked as seen, so a
    /// crash in between stores it twice at worst, never not at all.
    ///
    /// `raw` is the element's bytes as received, which need not be UTF-8;
    /// the dead letter keeps them exactly.
    pub fn keep_invalid(&self, tenant: &str, raw: &[u8], reason: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let mut key = tenant.as_bytes().to_vec();
        key.extend_from_slice(b"\0\0invalid:");
        key.extend_from_slice(raw);
        let seen = Seen::of_key(&key);
        if self.seen.contains(&seen, now) {
            return Ok(false);
        }
        self.store_dead_letter(DeadLetter::new(SOURCE_SINK, tenant, raw, reason))?;
        self.db.flush().map_err(|e| self.io(e))?;
        self.seen.insert(&[seen], now)?;
        Ok(true)
    }

    /// Drops dedupe generations older than the previous one; returns how
    /// many FullIds were forgotten.
    pub fn prune_dedupe(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        Ok(self.seen.prune(now)?)
    }

    /// Forgets every FullId seen for `tenant`, so a replay from an earlier
    /// checkpoint forwards those detections again. Returns how many.
    pub fn forget_seen(&self, tenant: &str) -> Result<usize, StoreError> {
        Ok(self.seen.forget_tenant(tenant)?)
    }

    /// Stores a detection (its JSON text `raw`) that a sink rejected for
    /// good. Returns the dead letter's id.
    pub fn dead_letter(&self, sink: &str, tenant: &str, raw: &str, reason: &str) -> Result<u64, StoreError> {
        self.store_dead_letter(DeadLetter::new(sink, tenant, raw.as_bytes(), reason))
    }

    fn store_dead_letter(&self, letter: DeadLetter) -> Result<u64, StoreError> {
        let id = self.db.generate_id().map_err(|e| self.io(e))?;
        let bytes = self.encode_dead_letter(&letter)?;
        self.dead_letters.insert(id.to_be_bytes(), bytes).map_err(|e| self.io(e))?;
        Ok(id)
    }

    fn encode_dead_letter(&self, letter: &DeadLetter) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(letter).map_err(|e| StoreError::Corrupt {
            path: self.dir.clone(),
            what: "dead letter",
            detail: e.to_string(),
        })
    }

    pub fn dead_letter_count(&self) -> usize {
        self.dead_letters.len()
    }

    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, StoreError> {
        let mut letters = Vec::new();
        for item in self.dead_letters.iter() {
            let (key, value) = item.map_err(|e| self.io(e))?;
            let mut letter: DeadLetter = serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                path: self.dir.clone(),
                what: "dead letter",
                detail: e.to_string(),
            })?;
            letter.id = seq_from(&key);
            if let Err(e) = letter.detection_bytes() {
                let detail = format!("id {}: detection_base64 is not valid base64 ({e})", letter.id);
                return Err(self.corrupt("dead letter", detail));
            }
            letters.push(letter);
        }
        Ok(letters)
    }

    /// Puts dead letters back into the outbox for the sink that rejected
    /// them (all when `ids` is empty), then deletes them. Returns the count.
    ///
    /// Rejects the whole request, before anything changes, when one of the
    /// letters is not UTF-8 or comes from a damaged spool record: queuing
    /// either would forward text that may differ from what was received.
    pub fn requeue_dead_letters(&self, ids: &[u64]) -> Result<usize, StoreError> {
        let selected: Vec<DeadLetter> =
            self.dead_letters()?.into_iter().filter(|letter| ids.is_empty() || ids.contains(&letter.id)).collect();
        // A damaged record's letter is often not UTF-8 too, and replaying
        // it is the fix to name.
        if let Some(letter) = selected.iter().find(|letter| letter.sink == SPOOL_SINK) {
            return Err(StoreError::RequeueDamaged { id: letter.id });
        }
        if let Some(letter) = selected.iter().find(|letter| !letter.is_utf8()) {
            return Err(StoreError::RequeueNotUtf8 { id: letter.id });
        }
        let mut count = 0;
        for letter in selected {
            let target = (letter.sink != SOURCE_SINK).then_some(letter.sink.as_str());
            let payload = BatchPayload::new(&letter.tenant, target, false, std::iter::once(letter.detection.as_str()));
            let _order = self.append_order.lock().unwrap_or_else(|e| e.into_inner());
            let record = self.spool.append_parts(&payload.parts())?;
            let time = Detection::from_json_text(&letter.detection).ok().and_then(|d| d.last_processed());
            let index = IndexEntry::new(record, 1, time.into_iter());
            if self.queue_dead_letter(letter.id, target, index.encode(&letter.tenant))? {
                self.outbox_bytes.fetch_add(u64::from(record.len), Ordering::Relaxed);
                count += 1;
            }
        }
        self.db.flush().map_err(|e| self.io(e))?;
        Ok(count)
    }

    /// Indexes the spooled copy of dead letter `id` in the outbox, for
    /// `target` only when given, and deletes the letter, in one transaction.
    /// A letter is thus never both queued and kept, not even after a crash.
    /// Returns false, and changes nothing, when the letter is already gone
    /// (another requeue or a purge took it). Its spool record is then
    /// deleted with its segment.
    fn queue_dead_letter(&self, id: u64, target: Option<&str>, index: Vec<u8>) -> Result<bool, StoreError> {
        let trees = (&self.outbox, &self.requeued, &self.dead_letters);
        let result = trees.transaction(|(outbox, requeued, dead_letters)| {
            if dead_letters.remove(&id.to_be_bytes())?.is_none() {
                return Ok(false);
            }
            // Sequence numbers start at 1: position 0 means nothing acknowledged.
            let seq = outbox.generate_id()? + 1;
            if let Some(sink) = target {
                requeued.insert(&seq.to_be_bytes(), sink.as_bytes())?;
            }
            outbox.insert(&seq.to_be_bytes(), index.as_slice())?;
            Ok::<_, ConflictableTransactionError<()>>(true)
        });
        result.map_err(|e| self.transaction_error(e))
    }

    /// Deletes dead letters (all when `ids` is empty). Returns the count.
    pub fn purge_dead_letters(&self, ids: &[u64]) -> Result<usize, StoreError> {
        let mut count = 0;
        for letter in self.dead_letters()? {
            if ids.is_empty() || ids.contains(&letter.id) {
                self.dead_letters.remove(letter.id.to_be_bytes()).map_err(|e| self.io(e))?;
                count += 1;
            }
        }
        self.db.flush().map_err(|e| self.io(e))?;
        Ok(count)
    }

    /// Flushes sled on the runtime's blocking pool. sled's own `flush_async`
    /// hands the flush to sled's thread pool, and every task there wakes all
    /// seven of its threads. The flush then hands its write to that pool once
    /// more. Each sink acknowledges every batch through here, so one handoff
    /// less per batch saves thread switches on the busiest path.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        match tokio::task::spawn_blocking(move || db.flush()).await {
            Ok(flushed) => flushed.map(drop).map_err(|e| self.io(e)),
            Err(join) => match join.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only a runtime shutdown cancels a blocking task.
                Err(_) => Err(StoreError::Cancelled),
            },
        }
    }
}

/// Fails when a state directory without a database still has spool
/// segments or dedupe files: opening would create an empty database, and
/// the queued detections would be lost without a word.
fn check_no_orphans(dir: &Path) -> Result<(), StoreError> {
    let count = |sub: &str, suffix: &str| {
        fs::read_dir(dir.join(sub))
            .map(|entries| entries.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().ends_with(suffix)).count())
            .unwrap_or(0)
    };
    let segments = count("spool", crate::spool::SUFFIX);
    let dedupe_files = count("seen", crate::seen::SUFFIX);
    let mut found = Vec::new();
    if segments > 0 {
        found.push(format!("{segments} spool segment(s) in spool/"));
    }
    if dedupe_files > 0 {
        found.push(format!("{dedupe_files} dedupe file(s) in seen/"));
    }
    if found.is_empty() {
        return Ok(());
    }
    Err(StoreError::MissingDatabase { dir: dir.to_path_buf(), found: found.join(" and ") })
}

/// Lists at most ten dead-letter ids for a log line, because a batch of
/// hundreds of detections would make one very long line.
fn listed_ids(ids: &[u64]) -> String {
    const LISTED_IDS: usize = 10;
    let mut letters: Vec<String> = ids.iter().take(LISTED_IDS).map(u64::to_string).collect();
    if ids.len() > LISTED_IDS {
        letters.push(format!("and {} more", ids.len() - LISTED_IDS));
    }
    letters.join(",")
}

/// Returns the LastProcessedTimeUtc range of `raws` as a reason's suffix,
/// for a replay from the API; empty when no text has that field.
/// Describes the window to replay for a damaged batch: the range its index
/// entry recorded when it was queued, or else the range of the detections
/// in `raws` that still parse. Empty when neither is known.
fn replay_window(index: &IndexEntry, raws: &[&str]) -> String {
    let window = index.window.or_else(|| {
        let times: Vec<DateTime<Utc>> =
            raws.iter().filter_map(|raw| Detection::from_json_text(raw).ok()?.last_processed()).collect();
        Some((*times.iter().min()?, *times.iter().max()?))
    });
    match window {
        Some((first, last)) => format!(
            "; the batch's LastProcessedTimeUtc runs from {} to {}",
            timefmt::format_api_time(first),
            timefmt::format_api_time(last)
        ),
        None => "; the batch's LastProcessedTimeUtc range is unknown (no detection of it could be read, and releases before schema version 3 did not record it), so replay from before the time it was queued".to_string(),
    }
}

/// Builds the dedupe key: tenant, 0x00, then [`Detection::dedupe_id`]. A
/// detection without a FullId is keyed by its whole text, so it is still
/// forwarded once and only once.
fn dedupe_key(tenant: &str, detection: &Detection) -> Vec<u8> {
    let id = detection.dedupe_id();
    let mut key = Vec::with_capacity(tenant.len() + 1 + id.len());
    key.extend_from_slice(tenant.as_bytes());
    key.push(0);
    key.extend_from_slice(&id);
    key
}

fn seq_from(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    let n = bytes.len().min(8);
    array[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(array)
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::CreateDir { path: dir.to_path_buf(), source };
    if !dir.exists() {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(err)?;
    }
    let mode = fs::metadata(dir).map_err(err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(err)?;
    }
    Ok(())
}

/// Takes an exclusive `flock` on the lock file and writes our pid into it.
fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    let path = dir.join(LOCK_FILE);
    let err = |source| StoreError::Lock { path: path.clone(), source };
    let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(err)?;
    // SAFETY: flock on a file descriptor we own; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
                pid: if pid.is_empty() { "unknown".into() } else { pid.to_string() },
            });
        }
        return Err(err(source));
    }
    file.set_len(0).map_err(err)?;
    file.rewind().map_err(err)?;
    writeln!(file, "{}", std::process::id()).map_err(err)?;
    file.sync_all().map_err(err)?;
    Ok(file)
}

/// Returns the database's schema version, writing the current one into a
/// new database. Rejects versions this release cannot read.
fn check_schema(meta: &Tree, db: &sled::Db, path: &Path) -> Result<u32, StoreError> {
    let io = |source| StoreError::Io { path: path.to_path_buf(), source };
    let Some(bytes) = meta.get("schema_version").map_err(io)? else {
        meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes()).map_err(io)?;
        db.flush().map_err(io)?;
        return Ok(SCHEMA_VERSION);
    };
    let found = u32::from_be_bytes(bytes.as_ref().try_into().unwrap_or([0xff; 4]));
    if ![SCHEMA_VERSION, SCHEMA_VERSION_NO_WINDOW, SCHEMA_VERSION_SLED_DEDUPE].contains(&found) {
        return Err(StoreError::Schema { path: path.to_path_buf(), found });
    }
    Ok(found)
}

/// Moves schema version 1's dedupe trees into `seen`, each into the
/// generation its name gives, then drops them; returns how many keys moved. A crash part way leaves the
/// trees in place, so the next start converts them again. A digest that is
/// then in a file twice is still added only once in memory.
fn migrate_sled_dedupe(db: &sled::Db, seen: &SeenSet, path: &Path) -> Result<usize, StoreError> {
    let io = |source| StoreError::Io { path: path.to_path_buf(), source };
    let mut converted = 0;
    for name in db.tree_names() {
        let Some(generation) = name.strip_prefix(DEDUPE_PREFIX.as_bytes()).and_then(parse_generation) else {
            continue;
        };
        let tree = db.open_tree(&name).map_err(io)?;
        let mut seens = Vec::with_capacity(tree.len());
        for key in tree.iter().keys() {
            seens.push(Seen::of_key(&key.map_err(io)?));
        }
        seen.insert_into(generation, &seens)?;
        db.drop_tree(&name).map_err(io)?;
        converted += seens.len();
    }
    Ok(converted)
}

/// Parses `<period>.<generation>` of a version 1 dedupe tree name.
fn parse_generation(text: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(text).ok()?;
    let (period, generation) = text.split_once('.')?;
    Some((period.parse().ok()?, generation.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detection(full_id: &str, time: &str) -> Detection {
        Detection::from_json_text(&format!(r#"{{"FullId":"{full_id}","LastProcessedTimeUtc":"{time}"}}"#)).unwrap()
    }

    #[tokio::test]
    async fn enqueue_skips_seen_full_ids_and_moves_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let t1 = timefmt::parse("2026-01-01T00:00:00.1234567Z").unwrap();
        let batch = [detection("a:1", "2026-01-01T00:00:00.1234567Z"), detection("a:2", "2026-01-01T00:00:00Z")];
        let first = store.enqueue("t", batch.to_vec(), Some(t1), Utc::now()).await.unwrap();
        assert_eq!(first, EnqueueOutcome { queued: 2, duplicates: 0 });
        let second = store.enqueue("t", batch.to_vec(), Some(t1), Utc::now()).await.unwrap();
        assert_eq!(second, EnqueueOutcome { queued: 0, duplicates: 2 });
        assert_eq!(store.checkpoint("t").unwrap(), Some(t1));
    }

    #[tokio::test]
    async fn checkpoint_never_moves_back_on_enqueue() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let late = timefmt::parse("2026-01-02T00:00:00Z").unwrap();
        let early = timefmt::parse("2026-01-01T00:00:00Z").unwrap();
        store.enqueue("t", Vec::new(), Some(late), Utc::now()).await.unwrap();
        store.enqueue("t", Vec::new(), Some(early), Utc::now()).await.unwrap();
        assert_eq!(store.checkpoint("t").unwrap(), Some(late));
    }

    #[tokio::test]
    async fn entries_are_released_after_every_cursor_passes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.sync_cursors(&["a", "b"]).unwrap();
        store.enqueue("t", vec![detection("x:1", "2026-01-01T00:00:00Z")], None, Utc::now()).await.unwrap();
        let batch = store.read_after(0, 10).unwrap();
        assert_eq!(batch.len(), 1);
        let seq = batch[0].0;
        store.set_cursor("a", seq).unwrap();
        assert_eq!(store.release().unwrap(), 0);
        store.set_cursor("b", seq).unwrap();
        assert_eq!(store.release().unwrap(), 1);
        assert_eq!(store.outbox_bytes(), 0);
    }

    #[tokio::test]
    async fn removed_sink_keeps_its_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.sync_cursors(&["a"]).unwrap();
        store.enqueue("t", vec![detection("x:1", "2026-01-01T00:00:00Z")], None, Utc::now()).await.unwrap();
        store.sync_cursors(&["a", "b"]).unwrap();
        assert_eq!(store.pending("b").unwrap().0, 0);
        assert_eq!(store.pending("a").unwrap().0, 1);

        // "a" renamed or removed with one detection pending: it stays queued.
        let unconfigured = store.sync_cursors(&["b"]).unwrap();
        assert_eq!(unconfigured, UnconfiguredSinks { released: vec![], pending: vec![("a".into(), 1)] });
        assert_eq!(store.read_after(0, 10).unwrap().len(), 1);
        // Configured again, it still has it.
        store.sync_cursors(&["a", "b"]).unwrap();
        assert_eq!(store.pending("a").unwrap().0, 1);

        assert_eq!(store.drop_sink("a").unwrap(), 1);
        assert_eq!(store.read_after(0, 10).unwrap().len(), 0);
        assert_eq!(store.cursor("a").unwrap(), None);
        assert!(matches!(store.drop_sink("a"), Err(StoreError::UnknownSink(name)) if name == "a"));
    }

    #[tokio::test]
    async fn removed_sink_without_backlog_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.sync_cursors(&["a", "b"]).unwrap();
        store.enqueue("t", vec![detection("x:1", "2026-01-01T00:00:00Z")], None, Utc::now()).await.unwrap();
        let seq = store.read_after(0, 10).unwrap()[0].0;
        store.set_cursor("a", seq).unwrap();
        let unconfigured = store.sync_cursors(&["b"]).unwrap();
        assert_eq!(unconfigured, UnconfiguredSinks { released: vec!["a".into()], pending: vec![] });
        assert_eq!(store.cursor("a").unwrap(), None);
        assert_eq!(store.pending("b").unwrap().0, 1);
    }

    #[test]
    fn batch_format_is_fixed() {
        // Spool records written by earlier releases must keep reading back.
        let payload = BatchPayload::new("t", Some("s"), true, ["{}", "ab"].into_iter());
        let expected: &[u8] = &[3, 0, 1, b't', 0, 1, b's', 0, 0, 0, 2, 0, 0, 0, 2, b'{', b'}', 0, 0, 0, 2, b'a', b'b'];
        assert_eq!(payload.parts().concat(), expected);
        let view = BatchView::decode(expected).unwrap();
        assert_eq!((view.tenant.as_str(), view.only_sink.as_deref(), view.checked), ("t", Some("s"), true));
        assert_eq!(view.texts().unwrap(), ["{}", "ab"]);
    }

    #[tokio::test]
    async fn open_without_database_keeps_orphaned_queue() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.sync_cursors(&["a"]).unwrap();
            store.enqueue("t", vec![detection("x:1", "2026-01-01T00:00:00Z")], None, Utc::now()).await.unwrap();
        }
        // An emptied db/ is as good as none.
        for entry in fs::read_dir(dir.path().join("db")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                fs::remove_dir_all(path).unwrap();
            } else {
                fs::remove_file(path).unwrap();
            }
        }
        let error = Store::open(dir.path()).err().unwrap().to_string();
        assert!(error.contains("has 1 spool segment(s) in spool/ and 1 dedupe file(s) in seen/ but no database (db/)"), "{error}");
        assert!(error.contains("state set-checkpoint --resend"), "{error}");
        assert!(!dir.path().join("db/db").exists(), "nothing was created");
        fs::remove_dir_all(dir.path().join("db")).unwrap();
        assert!(Store::open(dir.path()).is_err(), "a deleted db/ is refused too");

        // Without the spool, the dedupe set alone would still skip them.
        fs::remove_dir_all(dir.path().join("spool")).unwrap();
        let error = Store::open(dir.path()).err().unwrap().to_string();
        assert!(error.contains("has 1 dedupe file(s) in seen/ but no database"), "{error}");

        fs::remove_dir_all(dir.path().join("seen")).unwrap();
        assert!(Store::open(dir.path()).is_ok(), "an empty directory starts over");
    }

    #[test]
    fn second_open_names_the_owner_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains(&std::process::id().to_string()), "{err}");
    }

    #[test]
    fn concurrent_enqueue_queues_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        store.sync_cursors(&["a"]).unwrap();
        let detections: Vec<Detection> =
            (0..50).map(|i| detection(&format!("x:{i}"), "2026-01-01T00:00:00Z")).collect();
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                let detections = detections.clone();
                std::thread::spawn(move || store.enqueue_blocking("t", detections.clone(), None, Utc::now()).unwrap())
            })
            .collect();
        let queued: usize = threads.into_iter().map(|t| t.join().unwrap().queued).sum();
        assert_eq!(queued, 50);
        assert_eq!(store.pending("a").unwrap().0, 50);
    }

    #[test]
    fn version_1_dedupe_trees_are_converted() {
        let dir = tempfile::tempdir().unwrap();
        let retention = 7 * 24 * 3600;
        let period = retention / 2;
        let generation = Utc::now().timestamp() as u64 / period;
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            db.open_tree("meta").unwrap().insert("schema_version", &1u32.to_be_bytes()).unwrap();
            let tree = db.open_tree(format!("dedupe.{period}.{generation}")).unwrap();
            tree.insert(b"t\0old:1", &[]).unwrap();
            tree.insert(b"t\0\0invalid:[1]", &[]).unwrap();
            db.flush().unwrap();
        }
        let options = StoreOptions { dedupe_retention_secs: retention, ..StoreOptions::default() };
        let store = Store::open_with(dir.path(), options).unwrap();
        assert_eq!(store.dedupe_len(), 2);
        let again = store.enqueue_blocking("t", vec![detection("old:1", "2026-01-01T00:00:00Z")], None, Utc::now()).unwrap();
        assert_eq!(again, EnqueueOutcome { queued: 0, duplicates: 1 });
        assert!(!store.keep_invalid("t", b"[1]", "not an object", Utc::now()).unwrap());
        assert!(!store.db.tree_names().iter().any(|name| name.starts_with(DEDUPE_PREFIX.as_bytes())));
        // Read through the open store: sled's threads may hold the files a
        // moment after a drop, so reopening could fail on its lock.
        let version = store.db.open_tree("meta").unwrap().get("schema_version").unwrap().unwrap();
        assert_eq!(version.as_ref(), SCHEMA_VERSION.to_be_bytes());
    }

    #[test]
    fn invalid_element_is_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let now = Utc::now();
        assert!(store.keep_invalid("t", b"[1]", "not an object", now).unwrap());
        assert!(!store.keep_invalid("t", b"[1]", "not an object", now).unwrap());
        assert!(store.keep_invalid("other", b"[1]", "not an object", now).unwrap());
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 2);
        assert_eq!(letters[0].sink, SOURCE_SINK);
        assert_eq!(letters[0].detection, "[1]");
        assert_eq!(letters[0].reason, "not an object");
    }

    #[test]
    fn non_utf8_element_keeps_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        {
            let store = Store::open(dir.path()).unwrap();
            assert!(store.keep_invalid("t", b"[\"a\xff\"]", "not valid UTF-8", now).unwrap());
            // The same text once made lossy, but other bytes: not a repeat.
            assert!(store.keep_invalid("t", b"[\"a\xfe\"]", "not valid UTF-8", now).unwrap());
            assert!(!store.keep_invalid("t", b"[\"a\xfe\"]", "not valid UTF-8", now).unwrap());
        }
        let store = reopen(dir.path());
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 2);
        assert!(!letters[0].is_utf8());
        assert_eq!(letters[0].detection_bytes().unwrap().as_ref(), b"[\"a\xff\"]");
        assert_eq!(letters[1].detection_bytes().unwrap().as_ref(), b"[\"a\xfe\"]");
        assert_eq!(letters[0].detection, "[\"a\u{fffd}\"]", "a copy for display");
        let stored = store.dead_letters.iter().values().next().unwrap().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&stored).unwrap();
        assert_eq!(json["detection_base64"], "WyJh/yJd");
    }

    #[test]
    fn utf8_letter_stores_no_base64() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.dead_letter("http", "t", "{\"FullId\":\"é\"}", "HTTP 400").unwrap();
        let stored = store.dead_letters.iter().values().next().unwrap().unwrap();
        assert!(!String::from_utf8(stored.to_vec()).unwrap().contains("detection_base64"));
        let letter = &store.dead_letters().unwrap()[0];
        assert!(letter.is_utf8());
        assert_eq!(letter.detection_bytes().unwrap().as_ref(), "{\"FullId\":\"é\"}".as_bytes());
    }

    #[test]
    fn letters_of_earlier_releases_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = r#"{"sink":"siem","tenant":"t","reason":"r","time":"2026-01-01T00:00:00Z","detection":"{\"FullId\":\"a:1\"}"}"#;
        store.dead_letters.insert(7u64.to_be_bytes(), old.as_bytes()).unwrap();
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters[0].id, 7);
        assert!(letters[0].is_utf8());
        assert_eq!(letters[0].detection_bytes().unwrap().as_ref(), br#"{"FullId":"a:1"}"#);
    }

    #[test]
    fn invalid_base64_is_reported_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bad = r#"{"sink":"s","tenant":"t","reason":"r","time":"x","detection":"?","detection_base64":"***"}"#;
        store.dead_letters.insert(9u64.to_be_bytes(), bad.as_bytes()).unwrap();
        let err = store.dead_letters().unwrap_err().to_string();
        assert!(err.contains("id 9: detection_base64 is not valid base64"), "{err}");
    }

    #[tokio::test]
    async fn requeue_rejects_non_utf8_letters() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.sync_cursors(&["a"]).unwrap();
        store.dead_letter("a", "t", "{}", "HTTP 400").unwrap();
        store.keep_invalid("t", b"{\"x\":\"\xc3\"}", "not valid UTF-8", Utc::now()).unwrap();
        let bad_id = store.dead_letters().unwrap()[1].id;
        let err = store.requeue_dead_letters(&[]).unwrap_err();
        assert!(matches!(err, StoreError::RequeueNotUtf8 { id } if id == bad_id), "{err}");
        let message = err.to_string();
        assert!(message.contains(&format!("dead letter {bad_id} is not valid UTF-8")), "{message}");
        assert!(message.contains(&format!("--id {bad_id} --raw")), "{message}");
        assert_eq!(store.dead_letters().unwrap().len(), 2, "nothing changed");
        assert_eq!(store.pending("a").unwrap().0, 0);
        let good_id = store.dead_letters().unwrap()[0].id;
        assert_eq!(store.requeue_dead_letters(&[good_id]).unwrap(), 1, "the others can still be requeued by id");
    }

    /// Queues three batches of two detections, reopens the store so none
    /// is in memory, and returns it with the spool records in queue order.
    async fn three_spooled_batches(dir: &Path) -> (Store, Vec<RecordRef>) {
        {
            let store = Store::open(dir).unwrap();
            store.sync_cursors(&["a"]).unwrap();
            for batch in 0..3 {
                let pair = (0..2).map(|i| detection(&format!("b{batch}:{i}"), &format!("2026-01-01T00:00:0{batch}.{i}Z"))).collect();
                store.enqueue("t", pair, None, Utc::now()).await.unwrap();
            }
        }
        let store = reopen(dir);
        let records = store.outbox.iter().values().map(|v| IndexEntry::decode(&v.unwrap()).unwrap().record).collect();
        (store, records)
    }

    /// Opens a store that this process just dropped. sled's pool threads can
    /// hold the database lock a moment longer, so this tries for up to five
    /// seconds.
    fn reopen(dir: &Path) -> Store {
        let mut last_error = None;
        for _ in 0..50 {
            match Store::open(dir) {
                Ok(store) => return store,
                Err(e) => last_error = Some(e),
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("cannot open the store again: {last_error:?}");
    }

    fn read_ids(store: &Store) -> Vec<String> {
        store.read_after(0, 100).unwrap().iter().map(|(_, e)| e.detection().full_id().unwrap().into_owned()).collect()
    }

    #[tokio::test]
    async fn crc_mismatch_moves_batch_to_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        let path = store.spool.segment_path(records[1].segment);
        let mut bytes = fs::read(&path).unwrap();
        // Inside the first detection's text of batch 2: "b1:0" becomes "b1:1".
        let at = records[1].offset as usize + memchr::memmem::find(&bytes[records[1].offset as usize..], b"b1:0").unwrap() + 3;
        bytes[at] ^= 0x01;
        fs::write(&path, bytes).unwrap();
        let bytes_before = store.outbox_bytes();
        let counted_before = crate::telemetry::global().metrics.value(&crate::telemetry::SPOOL_DAMAGED, &[]).unwrap_or(0.0);

        assert_eq!(read_ids(&store), ["b0:0", "b0:1", "b2:0", "b2:1"], "the sinks read past the damaged batch");
        assert_eq!(store.outbox_bytes(), bytes_before - u64::from(records[1].len));
        let counted = crate::telemetry::global().metrics.value(&crate::telemetry::SPOOL_DAMAGED, &[]).unwrap();
        assert!(counted >= counted_before + 1.0, "{counted} after {counted_before}");

        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 2, "one letter per detection of the batch");
        assert!(letters.iter().all(|l| l.sink == SPOOL_SINK && l.tenant == "t"));
        assert!(letters[0].detection.contains("\"b1:1\""), "the bytes as read: {}", letters[0].detection);
        assert!(letters[1].detection.contains("\"b1:1\""), "{}", letters[1].detection);
        let reason = &letters[0].reason;
        assert!(reason.contains(&path.display().to_string()), "{reason}");
        assert!(reason.contains(&format!("offset {}", records[1].offset)), "{reason}");
        assert!(reason.contains("detection 0 of outbox batch 2 (2 detections)"), "{reason}");
        assert!(reason.contains("CRC mismatch"), "{reason}");
        assert!(reason.contains("LastProcessedTimeUtc runs from 2026-01-01T00:00:01.0000000Z to 2026-01-01T00:00:01.1000000Z"), "{reason}");
        let err = store.requeue_dead_letters(&[]).unwrap_err();
        assert!(matches!(err, StoreError::RequeueDamaged { .. }), "{err}");

        drop(store);
        let store = reopen(dir.path());
        assert_eq!(read_ids(&store), ["b0:0", "b0:1", "b2:0", "b2:1"], "set aside for good");
        assert_eq!(store.dead_letters().unwrap().len(), 2, "and only once");
    }

    #[tokio::test]
    async fn failed_set_aside_stores_letters_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        let path = store.spool.segment_path(records[2].segment);
        OpenOptions::new().write(true).open(&path).unwrap().set_len(records[2].offset + 3).unwrap();

        store.fail_next_write();
        assert!(store.read_after(0, 100).is_err());
        assert_eq!(store.dead_letter_count(), 0, "no letter while the batch is still queued");

        assert_eq!(read_ids(&store), ["b0:0", "b0:1", "b1:0", "b1:1"], "the read after the failure sets the batch aside");
        assert_eq!(store.dead_letter_count(), 1);
        assert_eq!(store.dead_letters().unwrap()[0].sink, SPOOL_SINK);
    }

    #[tokio::test]
    async fn truncated_spool_moves_batch_to_dead_letters() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        let path = store.spool.segment_path(records[2].segment);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(records[2].offset + 8 + 5).unwrap();

        assert_eq!(read_ids(&store), ["b0:0", "b0:1", "b1:0", "b1:1"]);
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1, "a cut batch stays in one letter");
        assert_eq!(letters[0].sink, SPOOL_SINK);
        assert!(letters[0].reason.contains("cut short: only 5 of its"), "{}", letters[0].reason);
        assert!(letters[0].reason.contains("the 5 bytes that could be read"), "{}", letters[0].reason);
        let head = fs::read(&path).unwrap()[records[2].offset as usize + 8..].to_vec();
        assert_eq!(letters[0].detection_bytes().unwrap().as_ref(), head.as_slice());
        assert_eq!(letters[0].tenant, "t", "five bytes end inside the batch head, so the index names the tenant");
    }

    #[tokio::test]
    async fn spool_cut_before_header_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        let path = store.spool.segment_path(records[2].segment);
        OpenOptions::new().write(true).open(&path).unwrap().set_len(records[2].offset + 3).unwrap();
        assert_eq!(read_ids(&store).len(), 4);
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert!(letters[0].detection.is_empty());
        assert!(letters[0].reason.contains("before the record's 8-byte header"), "{}", letters[0].reason);
        assert!(letters[0].reason.contains("outbox batch 3 (2 detections)"), "{}", letters[0].reason);
        // Nothing of the record is left, so the window and the tenant come
        // from the index.
        let window = "LastProcessedTimeUtc runs from 2026-01-01T00:00:02.0000000Z to 2026-01-01T00:00:02.1000000Z";
        assert!(letters[0].reason.contains(window), "{}", letters[0].reason);
        assert_eq!(letters[0].tenant, "t");
    }

    #[test]
    fn index_entry_round_trips_with_and_without_window() {
        let record = RecordRef { segment: 7, offset: 1 << 40, len: 513 };
        let times = ["2026-01-01T00:00:02.1000000Z", "9999-12-31T23:59:59.9999999Z", "1601-01-01T00:00:00Z"].map(|t| timefmt::parse(t).unwrap());
        let with = IndexEntry::new(record, 3, times.into_iter());
        let encoded = with.encode("tenant-ü");
        let decoded = IndexEntry::decode(&encoded).unwrap();
        assert_eq!(IndexEntry::tenant_of(&encoded).as_deref(), Some("tenant-ü"));
        assert_eq!(decoded.window, Some((times[2], times[1])));
        assert_eq!((decoded.record.segment, decoded.record.offset, decoded.record.len, decoded.count), (7, 1 << 40, 513, 3));

        let without = IndexEntry::new(record, 1, std::iter::empty());
        assert_eq!(IndexEntry::decode(&without.encode("t")).unwrap().window, None);
        assert_eq!(IndexEntry::tenant_of(&without.encode("t")).as_deref(), Some("t"));

        // Schema version 2 wrote format 3: 25 bytes, no window.
        let mut old = vec![INDEX_FORMAT_NO_WINDOW];
        old.extend_from_slice(&7u64.to_be_bytes());
        old.extend_from_slice(&(1u64 << 40).to_be_bytes());
        old.extend_from_slice(&513u32.to_be_bytes());
        old.extend_from_slice(&3u32.to_be_bytes());
        let decoded = IndexEntry::decode(&old).unwrap();
        assert_eq!((decoded.count, decoded.window), (3, None));
        assert_eq!(IndexEntry::tenant_of(&old), None);
        assert!(IndexEntry::decode(&old[..24]).is_none(), "a cut entry is rejected");
    }

    /// Changes the payload of `record` with `change` and writes a CRC that
    /// matches the new bytes, so only the batch format can tell.
    fn rewrite_with_valid_crc(store: &Store, record: RecordRef, change: impl FnOnce(&mut [u8])) {
        let path = store.spool.segment_path(record.segment);
        let mut bytes = fs::read(&path).unwrap();
        let start = record.offset as usize + 8;
        let payload = &mut bytes[start..start + record.len as usize];
        change(payload);
        let crc = crc32fast::hash(payload).to_be_bytes();
        bytes[start - 4..start].copy_from_slice(&crc);
        fs::write(&path, bytes).unwrap();
    }

    #[tokio::test]
    async fn undecodable_batch_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        rewrite_with_valid_crc(&store, records[1], |payload| payload[0] = 9);
        let path = store.spool.segment_path(records[1].segment);

        assert_eq!(read_ids(&store), ["b0:0", "b0:1", "b2:0", "b2:1"], "the sinks read past the batch");
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1, "one letter with the whole record");
        assert_eq!(letters[0].sink, SPOOL_SINK);
        assert_eq!(letters[0].detection_bytes().unwrap().len(), records[1].len as usize);
        let reason = &letters[0].reason;
        assert!(reason.contains(&path.display().to_string()), "{reason}");
        assert!(reason.contains(&format!("offset {}", records[1].offset)), "{reason}");
        assert!(reason.contains("outbox batch 2 (2 detections)"), "{reason}");
        assert!(reason.contains("unknown batch format version 9"), "{reason}");
        let err = store.requeue_dead_letters(&[]).unwrap_err();
        assert!(matches!(err, StoreError::RequeueDamaged { .. }), "{err}");
    }

    #[tokio::test]
    async fn non_utf8_text_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        rewrite_with_valid_crc(&store, records[1], |payload| {
            let at = memchr::memmem::find(payload, b"b1:1").unwrap();
            payload[at] = 0xff;
        });

        assert_eq!(read_ids(&store), ["b0:0", "b0:1", "b2:0", "b2:1"]);
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert!(!letters[0].is_utf8(), "the bytes are kept exactly");
        assert_eq!(letters[0].tenant, "t");
        assert!(letters[0].reason.contains("detection 1 of 2 is not valid UTF-8"), "{}", letters[0].reason);
        let err = store.requeue_dead_letters(&[]).unwrap_err();
        assert!(matches!(err, StoreError::RequeueDamaged { .. }), "the damage, not the encoding, is named: {err}");
    }

    #[tokio::test]
    async fn count_mismatch_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        // The count follows the version byte and the two names "t" and "",
        // each after its 2-byte length.
        rewrite_with_valid_crc(&store, records[2], |payload| payload[6..10].copy_from_slice(&1u32.to_be_bytes()));

        assert_eq!(read_ids(&store), ["b0:0", "b0:1", "b1:0", "b1:1"], "no detection of the batch is sent");
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert!(letters[0].reason.contains("the batch holds 1 detections, the outbox index 2"), "{}", letters[0].reason);
        let window = "LastProcessedTimeUtc runs from 2026-01-01T00:00:02.0000000Z to 2026-01-01T00:00:02.1000000Z";
        assert!(letters[0].reason.contains(window), "the reason gives the window to replay: {}", letters[0].reason);
    }

    /// Rewrites the third batch's outbox entry without its window, as
    /// schema version 2 wrote entries.
    fn drop_window_of_third_batch(store: &Store) {
        let (key, value) = store.outbox.iter().nth(2).unwrap().unwrap();
        let entry = IndexEntry { window: None, ..IndexEntry::decode(&value).unwrap() };
        store.outbox.insert(key, entry.encode("t")).unwrap();
    }

    /// An entry without a window (written by schema version 2) gets the
    /// window from the detections that still read.
    #[tokio::test]
    async fn windowless_entry_reads_window_from_texts() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        drop_window_of_third_batch(&store);
        rewrite_with_valid_crc(&store, records[2], |payload| payload[6..10].copy_from_slice(&1u32.to_be_bytes()));

        assert_eq!(read_ids(&store), ["b0:0", "b0:1", "b1:0", "b1:1"]);
        let letters = store.dead_letters().unwrap();
        let window = "LastProcessedTimeUtc runs from 2026-01-01T00:00:02.0000000Z to 2026-01-01T00:00:02.1000000Z";
        assert!(letters[0].reason.contains(window), "{}", letters[0].reason);
    }

    /// Without a window in the entry and nothing readable, the reason states
    /// that the range is unknown.
    #[tokio::test]
    async fn windowless_lost_record_says_range_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        drop_window_of_third_batch(&store);
        let path = store.spool.segment_path(records[2].segment);
        OpenOptions::new().write(true).open(&path).unwrap().set_len(records[2].offset + 3).unwrap();

        assert_eq!(read_ids(&store).len(), 4);
        let letters = store.dead_letters().unwrap();
        assert!(letters[0].reason.contains("LastProcessedTimeUtc range is unknown"), "{}", letters[0].reason);
        assert_eq!(letters[0].tenant, "t");
    }

    #[tokio::test]
    async fn trailing_bytes_are_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (store, records) = three_spooled_batches(dir.path()).await;
        // The last detection's length shrinks by one, so its closing brace
        // is left over after it; every text stays valid UTF-8.
        rewrite_with_valid_crc(&store, records[0], |payload| {
            let at = memchr::memmem::rfind(payload, b"{").unwrap();
            let len = u32::from_be_bytes(payload[at - 4..at].try_into().unwrap()) - 1;
            payload[at - 4..at].copy_from_slice(&len.to_be_bytes());
        });

        assert_eq!(read_ids(&store), ["b1:0", "b1:1", "b2:0", "b2:1"]);
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert!(letters[0].reason.contains("1 byte follows the last detection"), "{}", letters[0].reason);
        // The index recorded the window of both detections when they were queued.
        let window = "LastProcessedTimeUtc runs from 2026-01-01T00:00:00.0000000Z to 2026-01-01T00:00:00.1000000Z";
        assert!(letters[0].reason.contains(window), "{}", letters[0].reason);
    }

    #[test]
    fn schema_version_2_opens_as_3() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            db.open_tree("meta").unwrap().insert("schema_version", &2u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let store = reopen(dir.path());
        let version = store.db.open_tree("meta").unwrap().get("schema_version").unwrap().unwrap();
        assert_eq!(version.as_ref(), 3u32.to_be_bytes());
    }

    #[test]
    fn unknown_schema_version_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path().join("db")).unwrap();
            db.open_tree("meta").unwrap().insert("schema_version", &7u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let err = (0..50)
            .find_map(|_| match Store::open(dir.path()) {
                Err(StoreError::Open { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    None
                }
                other => Some(other),
            })
            .unwrap()
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Schema { found: 7, .. }), "{err}");
    }

    #[test]
    fn state_dir_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let _store = Store::open(&state).unwrap();
        let mode = fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[tokio::test]
    async fn dead_letters_requeue_for_their_sink_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.dead_letter("http", "t", "{}", "HTTP 400: bad event").unwrap();
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason, "HTTP 400: bad event");
        store.sync_cursors(&["http", "siem"]).unwrap();
        assert_eq!(store.requeue_dead_letters(&[]).unwrap(), 1);
        assert_eq!(store.pending("http").unwrap().0, 1);
        assert_eq!(store.pending("siem").unwrap().0, 0, "a letter for another sink is not pending");
        let batch = store.read_after(0, 10).unwrap();
        assert_eq!(batch[0].1.only_sink(), Some("http"));
        assert!(!batch[0].1.checked(), "a requeued letter is checked again by each sink");
        assert!(store.dead_letters().unwrap().is_empty());
        // Once delivered, the batch and its mark are deleted together.
        let last = store.last_seq().unwrap();
        store.set_cursor("http", last).unwrap();
        store.set_cursor("siem", last).unwrap();
        assert_eq!(store.release().unwrap(), 1);
        assert!(store.requeued.is_empty());
    }

    #[tokio::test]
    async fn letters_and_cursor_commit_together() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.sync_cursors(&["a", "b"]).unwrap();
            let pair = vec![detection("x:1", "2026-01-01T00:00:00Z"), detection("x:2", "2026-01-01T00:00:00Z")];
            store.enqueue("t", pair, None, Utc::now()).await.unwrap();
            let read = store.read_after(0, 10).unwrap();
            let rejected: Vec<(&OutboxEntry, &str)> = read.iter().map(|(_, entry)| (entry, "HTTP 400")).collect();

            store.fail_next_write();
            assert!(store.ack_with_dead_letters("a", read[1].0, &rejected).await.is_err());
            assert_eq!(store.dead_letter_count(), 0, "no letter without the cursor move");
            assert_eq!(store.cursor("a").unwrap(), Some(0));

            store.ack_with_dead_letters("a", read[1].0, &rejected).await.unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(store.cursor("a").unwrap(), Some(position(1, 1)), "flushed with the letters");
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 2);
        assert!(letters.iter().all(|l| l.sink == "a" && l.tenant == "t" && l.reason == "HTTP 400"));
        assert!(letters[0].detection.contains("x:1"), "{}", letters[0].detection);
        assert!(letters[1].detection.contains("x:2"), "{}", letters[1].detection);
        assert_eq!(store.pending("b").unwrap().0, 2, "the other sink still has both");
    }

    /// Two requeues of the same letters at once queue each letter once.
    /// The directory lock keeps a second process out, so only two callers
    /// in one process can race like this.
    #[test]
    fn concurrent_requeues_queue_each_letter_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        store.sync_cursors(&["a"]).unwrap();
        const LETTERS: usize = 50;
        for i in 0..LETTERS {
            store.dead_letter("a", "t", &format!(r#"{{"FullId":"x:{i}"}}"#), "HTTP 400").unwrap();
        }
        let requeues: Vec<_> = (0..2)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || store.requeue_dead_letters(&[]).unwrap())
            })
            .collect();
        let queued: usize = requeues.into_iter().map(|requeue| requeue.join().unwrap()).sum();
        assert_eq!(queued, LETTERS);
        assert_eq!(store.pending("a").unwrap().0, LETTERS);
        assert_eq!(store.dead_letter_count(), 0);
    }

    #[tokio::test]
    async fn queued_detections_are_marked_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.enqueue("t", vec![detection("x:1", "2026-01-01T00:00:00Z")], None, Utc::now()).await.unwrap();
        let batch = store.read_after(0, 10).unwrap();
        assert_eq!(batch.len(), 1);
        assert!(batch[0].1.checked());
    }

    /// A batch read back from the spool, once no longer in memory, is the
    /// batch as queued: tenant, check mark, order and every byte of text.
    #[tokio::test]
    async fn spool_reads_match_queued_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut queued: Vec<Detection> = (0..5).map(|i| detection(&format!("x:{i}"), "2026-01-01T00:00:00Z")).collect();
        queued.push(Detection::from_json_text(r#"{"FullId":"\u00e9 \"q\"","Title":"使用者\n","N":1E400}"#).unwrap());
        store.enqueue("tenant-a", queued.clone(), None, Utc::now()).await.unwrap();
        let show = |entries: &[(u64, OutboxEntry)]| -> Vec<(u64, String, String, bool)> {
            entries.iter().map(|(p, e)| (*p, e.tenant().to_string(), e.raw().to_string(), e.checked())).collect()
        };
        let in_memory = show(&store.read_after(0, 100).unwrap());
        store.forget_delivered_batches();
        let from_spool = show(&store.read_after(0, 100).unwrap());
        assert_eq!(from_spool, in_memory);
        let texts: Vec<&str> = from_spool.iter().map(|(_, _, raw, _)| raw.as_str()).collect();
        let expected: Vec<&str> = queued.iter().map(Detection::raw).collect();
        assert_eq!(texts, expected);
        assert!(from_spool.iter().all(|(_, tenant, _, _)| tenant == "tenant-a"));
        assert!(from_spool.iter().all(|(_, _, _, checked)| *checked));
    }

    /// Batches stay in memory up to a number of detections, not of batches,
    /// so large batches do not multiply the memory kept, and the newest
    /// batch stays even when it alone is over the limit.
    #[test]
    fn memory_keeps_batches_up_to_detections() {
        let batch = |count: usize| {
            let detections = (0..count).map(|i| detection(&format!("m:{i}"), "2026-01-01T00:00:00Z")).collect();
            Arc::new(QueuedBatch { tenant: "t".into(), only_sink: None, checked: true, detections })
        };
        let mut recent = RecentBatches::new(1000);
        for seq in 1..=4 {
            assert!(recent.keep(seq, batch(250)).is_empty(), "batch {seq} fits");
        }
        let pushed_out = recent.keep(5, batch(500));
        assert_eq!(pushed_out.iter().map(|b| b.detections.len()).collect::<Vec<_>>(), [250, 250]);
        assert!(recent.get(2).is_none());
        assert!(recent.get(3).is_some());
        assert!(recent.get(5).is_some());
        assert_eq!(recent.detection_count, 1000);
        assert_eq!(recent.keep(6, batch(1500)).len(), 3);
        assert!(recent.get(6).is_some(), "the newest batch stays");
        assert_eq!(recent.detection_count, 1500);
        assert_eq!(recent.drop_before(7).len(), 1);
        assert_eq!(recent.detection_count, 0);
    }

    #[tokio::test]
    async fn pause_keeps_batches_slow_sinks_need() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.sync_cursors(&["fast", "slow"]).unwrap();
        let queued: Vec<Detection> = (0..3).map(|i| detection(&format!("x:{i}"), "2026-01-01T00:00:00Z")).collect();
        store.enqueue("t", queued, None, Utc::now()).await.unwrap();
        let first = store.read_after(0, 10).unwrap();
        let last = first.last().unwrap().0;

        store.ack("fast", last).await.unwrap();
        store.forget_delivered_batches();
        let again = store.read_after(0, 10).unwrap();
        assert!(Arc::ptr_eq(&first[0].1.batch, &again[0].1.batch), "the slow sink's batch stays in memory");

        store.ack("slow", last).await.unwrap();
        store.forget_delivered_batches();
        let recent = store.recent.lock().unwrap();
        assert!(recent.queued.batches.is_empty());
        assert!(recent.read.batches.is_empty());
    }

    #[tokio::test]
    async fn prune_forgets_full_ids_after_two_generations() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions { dedupe_retention_secs: 7 * 24 * 3600, ..StoreOptions::default() };
        let store = Store::open_with(dir.path(), options).unwrap();
        // The start of a generation (half the retention, 302,400 s), so
        // four days later is in the next one at any wall-clock time.
        let start = DateTime::from_timestamp(302_400 * 5_800, 0).unwrap();
        let old = [detection("x:1", "2026-01-01T00:00:00Z")];
        store.enqueue("t", old.to_vec(), None, start).await.unwrap();
        let half_later = start + chrono::Duration::days(4);
        assert_eq!(store.prune_dedupe(half_later).unwrap(), 0);
        let again = store.enqueue("t", old.to_vec(), None, half_later).await.unwrap();
        assert_eq!(again.duplicates, 1, "still remembered after half the retention");
        let much_later = start + chrono::Duration::days(15);
        assert_eq!(store.prune_dedupe(much_later).unwrap(), 1);
        let after = store.enqueue("t", old.to_vec(), None, much_later).await.unwrap();
        assert_eq!(after.queued, 1, "forgotten after the retention");
    }

    /// Release deletes segments before the first remaining batch's segment,
    /// which is safe only while sequence order follows spool order, also
    /// when tenants queue at the same time across segment boundaries.
    #[test]
    fn concurrent_queuing_keeps_sequence_and_spool_order() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions { spool_segment_bytes: 512, ..StoreOptions::default() };
        let store = std::sync::Arc::new(Store::open_with(dir.path(), options).unwrap());
        let threads: Vec<_> = ["t1", "t2", "t3"]
            .into_iter()
            .map(|tenant| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                    for i in 0..40 {
                        let d = [detection(&format!("{tenant}:{i}"), "2026-01-01T00:00:00Z")];
                        runtime.block_on(store.enqueue(tenant, d.to_vec(), None, Utc::now())).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let places: Vec<(u64, u64)> = store
            .outbox
            .iter()
            .values()
            .map(|v| IndexEntry::decode(&v.unwrap()).unwrap().record)
            .map(|r| (r.segment, r.offset))
            .collect();
        assert_eq!(places.len(), 120);
        assert!(places.windows(2).all(|w| w[0] < w[1]), "{places:?}");
        assert_eq!(store.read_after(0, 1000).unwrap().len(), 120);
    }

    /// A crash right after a release that deleted a segment must not bring
    /// back index entries of that segment. The copy of the state directory
    /// is what a crash would leave: sled writes nothing without a flush.
    #[tokio::test]
    async fn release_flushes_before_deleting_segments() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let options = StoreOptions { spool_segment_bytes: 512, ..StoreOptions::default() };
        let store = Store::open_with(&state, options).unwrap();
        store.sync_cursors(&["sink"]).unwrap();
        for i in 0..20 {
            let d = [detection(&format!("id-{i}"), "2026-01-01T00:00:00Z")];
            store.enqueue("t", d.to_vec(), None, Utc::now()).await.unwrap();
        }
        let read = store.read_after(0, 1000).unwrap();
        assert_eq!(read.len(), 20);
        let segments_before = std::fs::read_dir(state.join("spool")).unwrap().count();

        store.set_cursor("sink", read[17].0).unwrap();
        store.release().unwrap();
        let segments_after = std::fs::read_dir(state.join("spool")).unwrap().count();
        assert!(segments_after < segments_before, "the release deleted a segment ({segments_before} -> {segments_after})");

        let image = dir.path().join("image");
        copy_dir(&state, &image);
        std::fs::remove_file(image.join(LOCK_FILE)).ok();
        let reopened = Store::open_with(&image, options).unwrap();
        let left: Vec<String> = reopened
            .read_after(0, 1000)
            .unwrap()
            .iter()
            .map(|(_, entry)| entry.detection().full_id().unwrap_or_default().into_owned())
            .collect();
        assert_eq!(left, ["id-18", "id-19"], "only what the sink had not acknowledged comes back");
        assert_eq!(reopened.dead_letter_count(), 0, "no entry points at a deleted segment");
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for item in std::fs::read_dir(from).unwrap() {
            let item = item.unwrap();
            let target = to.join(item.file_name());
            if item.file_type().unwrap().is_dir() {
                copy_dir(&item.path(), &target);
            } else {
                std::fs::copy(item.path(), target).unwrap();
            }
        }
    }

    /// A sink that keeps up releases the outbox to empty while the poller
    /// starts new segments: no segment may go before its batch is indexed.
    #[test]
    fn release_while_queuing_keeps_every_new_segment() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions { spool_segment_bytes: 64, ..StoreOptions::default() };
        let store = std::sync::Arc::new(Store::open_with(dir.path(), options).unwrap());
        store.sync_cursors(&["a"]).unwrap();
        const BATCHES: usize = 400;
        let queuing = {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..BATCHES {
                    let d = [detection(&format!("r:{i}"), "2026-01-01T00:00:00Z")];
                    store.enqueue_blocking("t", d.to_vec(), None, Utc::now()).unwrap();
                }
            })
        };
        let (mut delivered, mut cursor) = (0, 0);
        while delivered < BATCHES {
            let read = store.read_after(cursor, 10).unwrap_or_else(|e| panic!("after {delivered} delivered: {e}"));
            if let Some(&(last, _)) = read.last() {
                delivered += read.len();
                cursor = last;
                store.set_cursor("a", cursor).unwrap();
            }
            store.release().unwrap();
        }
        queuing.join().unwrap();
    }

    #[tokio::test]
    async fn drop_oldest_deletes_whole_oldest_batches_until_under_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.sync_cursors(&["a"]).unwrap();
        for batch in 0..4 {
            let detections: Vec<Detection> =
                (0..5).map(|i| detection(&format!("x:{batch}:{i}"), "2026-01-01T00:00:00Z")).collect();
            store.enqueue("t", detections.clone(), None, Utc::now()).await.unwrap();
        }
        let full = store.outbox_bytes();
        let dropped = store.drop_oldest(full / 2 + 1).unwrap();
        assert_eq!(dropped.count, 10, "the two oldest batches of five");
        let time = timefmt::parse("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(dropped.window, Some((time, time)));
        assert_eq!(dropped.tenants, ["t"]);
        assert!(store.outbox_bytes() <= full / 2 + 1);
        let left = store.read_after(0, 100).unwrap();
        assert_eq!(left.len(), 10);
        assert!(left[0].1.raw().contains("x:2:0"), "{}", left[0].1.raw());
    }

    #[tokio::test]
    async fn positions_cover_every_detection_of_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.sync_cursors(&["a"]).unwrap();
        let many: Vec<Detection> = (0..10).map(|i| detection(&format!("x:{i}"), "2026-01-01T00:00:00Z")).collect();
        store.enqueue("t", many[..6].to_vec(), None, Utc::now()).await.unwrap();
        store.enqueue("t", many[6..].to_vec(), None, Utc::now()).await.unwrap();
        let first = store.read_after(0, 4).unwrap();
        assert_eq!(first.len(), 4);
        store.ack("a", first[3].0).await.unwrap();
        assert_eq!(store.pending("a").unwrap().0, 6);
        let rest = store.read_after(first[3].0, 100).unwrap();
        let ids: Vec<String> = rest.iter().map(|(_, e)| e.raw().to_string()).collect();
        assert_eq!(ids.len(), 6);
        assert!(ids[0].contains("x:4") && ids[5].contains("x:9"), "{ids:?}");
        store.ack("a", rest[5].0).await.unwrap();
        assert_eq!(store.outbox_bytes(), 0, "both batches released");
    }
}
