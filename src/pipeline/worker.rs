//! One sink's delivery loop: read the outbox after the sink's cursor, route,
//! encode, send, and move the cursor only over entries that are settled.
//!
//! An entry is settled when the transport acknowledged it, when it was
//! dead-lettered (it cannot be encoded, or the receiver rejected it for
//! good), or when the sink's routing filters it out. A receiver may settle
//! only a prefix of a batch; the cursor then stops before the first unsettled
//! entry, and the next read starts there.
//!
//! A syslog TCP or TLS receiver confirms reading a batch only later, by
//! closing its side of the connection after the sink closed its own (see
//! [`crate::sink::StreamTransport`]). Until it does, the read waits in
//! [`SinkWorker::sent`], the next read starts after it, and the cursor
//! stays before it. When the connection is lost first, the unconfirmed
//! reads are dropped and read again from the cursor, so a stop or crash
//! at any point leaves every unconfirmed detection queued.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;

use crate::detection::Detection;
use crate::config::SinkCommon;
use crate::format::{encode_hec_event, EncodeOutcome, Encoder, HecOptions};
use crate::retry::Backoff;
use crate::sink::{Batch, Finish, SendOutcome, SinkError, Transport};
use crate::store::{OutboxEntry, Store, StoreError};

/// How long a worker that caught up waits for more before it gives the
/// memory of its last batches back.
const MEMORY_RELEASE_DELAY: Duration = Duration::from_secs(2);

/// How long a worker with batches the receiver has not confirmed reading
/// waits for more before it closes the connection to have them confirmed
/// (see [`crate::sink::StreamTransport::finish`]).
const IDLE_CLOSE_DELAY: Duration = Duration::from_secs(1);

/// What the pipeline asks of a worker. Workers see only the latest value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerMode {
    /// Deliver and wait for more.
    Run,
    /// Deliver what is queued, then exit (shutdown grace period, `--once`).
    Drain,
    /// Exit now; an unacknowledged batch stays in the outbox.
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("sink {sink}: {source}")]
    Send { sink: String, source: SinkError },
    #[error("sink {sink}: {source}")]
    Store { sink: String, source: StoreError },
    #[error("sink {sink}: stopped with {pending} detections still queued in the state directory{}", STOPPED_ADVICE)]
    Stopped { sink: String, pending: usize },
    #[error("sink {sink}: the receiver did not confirm reading the last detections sent ({cause}); they stay queued with the others ({pending} in all) and are sent again by the next run with this sink, so the receiver may get some twice")]
    Unconfirmed { sink: String, pending: usize, cause: &'static str },
}

/// The end of a [`WorkerError::Stopped`] message, which the demo replaces
/// because it deletes its state directory.
pub const STOPPED_ADVICE: &str = "; the next run with this sink configured sends them";

/// Turns one detection into one message of a sink.
#[derive(Clone, Debug)]
pub enum EventEncoder {
    /// Syslog, file and stdout messages, and the JSON items of HTTP bodies.
    Wire(Encoder),
    /// Splunk HEC event objects.
    Hec(HecOptions),
}

impl EventEncoder {
    /// Returns whether encoding reads individual fields (CEF, LEEF) rather than
    /// forwarding the raw JSON.
    pub(crate) fn needs_fields(&self) -> bool {
        matches!(self, EventEncoder::Wire(e) if e.payload() != crate::format::PayloadFormat::Json)
    }

    fn encode(&self, d: &Detection, now: chrono::DateTime<Utc>, out: &mut Vec<u8>) -> EncodeOutcome {
        match self {
            EventEncoder::Wire(encoder) => encoder.encode(d, now, out),
            EventEncoder::Hec(options) => {
                encode_hec_event(d, options, now, out);
                EncodeOutcome::default()
            }
        }
    }
}

/// The result of [`SinkWorker::add_message`] for one detection.
enum Added {
    Message,
    /// The batch is full without it; it goes into the next batch.
    BatchFull,
}

/// Detections rejected alone in a row after which a sink sends one
/// detection per request, until one is delivered. A receiver that rejects
/// every detection (a body format it does not take) would otherwise get
/// about log2(batch_size) requests per detection. Every dead letter is
/// still a detection the receiver rejected alone.
const BISECT_GIVE_UP: u32 = 3;

/// Drops the second half of `batch`; the next round reads again from the
/// entry of the first message left out. Returns the messages kept.
fn keep_first_half(batch: &mut Batch, prepared: &mut Prepared) -> usize {
    let keep = batch.len() / 2;
    keep_first(batch, prepared, keep);
    keep
}

/// Keeps the first `keep` messages of `batch` (fewer than it has); the next
/// round reads again from the entry of the first message left out.
fn keep_first(batch: &mut Batch, prepared: &mut Prepared, keep: usize) {
    while batch.len() > keep {
        batch.pop_message();
    }
    prepared.consumed = prepared.message_entries[keep];
    prepared.message_entries.truncate(keep);
}

/// A batch and where its messages came from in the outbox read.
#[derive(Default)]
struct Prepared {
    /// Entries of the read handled by this batch: sent, filtered out or
    /// dead-lettered. Entries after them are read again next time.
    consumed: usize,
    /// For each message, the index of its entry in the read.
    message_entries: Vec<usize>,
    /// Entries this sink cannot encode, with the reason. They become dead
    /// letters only when the cursor moves past them, so a batch that fails
    /// and is prepared again does not store them a second time.
    unencodable: Vec<(usize, String)>,
}

pub struct SinkWorker {
    pub(crate) name: String,
    pub(crate) store: Arc<Store>,
    pub(crate) transport: Transport,
    pub(crate) encoder: EventEncoder,
    /// Routing: tenants, severity and categories this sink takes.
    pub(crate) routing: SinkCommon,
    /// Messages shortened to fit `max_datagram_bytes` since start.
    pub(crate) shortened: u64,
    /// Shortened messages not yet added to the metric, with the FullId
    /// whole and cut: the metric is updated once per batch.
    pub(crate) unreported_shortened: [u64; 2],
    /// The largest batch part the receiver accepted after it rejected a
    /// larger batch as too large (HTTP 413). Later batches stay within it
    /// until the worker restarts (a reload or a restart of the daemon).
    pub(crate) receiver_max_batch_bytes: Option<usize>,
    /// Rejections in a row that named no detection, with nothing
    /// delivered between (see [`BISECT_GIVE_UP`]).
    pub(crate) rejected_alone: u32,
    /// Reads delivered to a receiver that has not confirmed reading them
    /// yet, oldest first (see the module's documentation).
    pub(crate) sent: VecDeque<Settlement>,
    /// Times in a row the unconfirmed reads were sent again after a lost
    /// connection without any being confirmed; limited by `max_attempts`.
    pub(crate) rewinds: u32,
    /// The retry delays after a receiver did not confirm by its close,
    /// reset once it confirms something.
    pub(crate) close_backoff: Backoff,
    pub(crate) batch_size: usize,
    pub(crate) retry_initial: Duration,
    pub(crate) retry_max: Duration,
    /// Attempts per batch before giving up; `None` retries forever (daemon).
    pub(crate) max_attempts: Option<u32>,
    pub(crate) wake: watch::Receiver<u64>,
    pub(crate) mode: watch::Receiver<WorkerMode>,
}

/// The outcome of a read's send: where the sink's cursor may move, and
/// the entries it passes that become dead letters, each with its reason.
/// Every such entry is before `position`, so there are none without one.
/// It is settled (stored) once the receiver confirmed reading the batch.
pub(crate) struct Settlement {
    position: Option<u64>,
    dead_letters: Vec<(OutboxEntry, String)>,
    /// Warnings about the dead letters, logged once they are stored.
    notices: Vec<Notice>,
    /// The messages the transport delivered for the read; none when every
    /// entry was filtered out or dead-lettered.
    messages: usize,
    /// The messages the receiver acknowledged: all but those it rejected.
    acknowledged: usize,
}

/// A warning about detections that moved to dead letters.
enum Notice {
    BatchRejected { events: usize, reason: String },
    OneRejected { tenant: String, delivered: usize, reason: String },
    Unencodable { tenant: String, reason: String },
}

impl Notice {
    fn log(&self, sink: &str) {
        match self {
            Notice::BatchRejected { events, reason } => {
                // A receiver that rejects everything would log one line per
                // detection, sent one at a time.
                if let Some(suppressed) = crate::telemetry::should_log(&format!("rejected {sink}: {reason}")) {
                    tracing::warn!(sink = %sink, events, reason = %reason, suppressed, "receiver rejected the batch; its detections moved to dead letters");
                }
            }
            Notice::OneRejected { tenant, delivered, reason } => tracing::warn!(
                sink = %sink,
                tenant = %tenant,
                delivered,
                reason = %reason,
                "receiver rejected one detection; it moved to dead letters and the rest of the batch is sent again"
            ),
            Notice::Unencodable { tenant, reason } => {
                tracing::warn!(sink = %sink, tenant = %tenant, reason = %reason, "detection moved to dead letters");
            }
        }
    }
}

enum Delivery {
    Done(SendOutcome),
    /// The receiver rejected the batch, of more than one message, as too large.
    TooLarge(SinkError),
    Stopped,
    /// The connection was lost with delivered batches the receiver may
    /// not have read: they are read again from the cursor.
    Rewind,
}

/// Returns how many of the newest `sent` reads wait for the receiver:
/// those of its newest `unconfirmed` batches, and any read after them.
fn waiting_reads(sent: &VecDeque<Settlement>, unconfirmed: usize) -> usize {
    let mut batches = 0;
    let mut reads = 0;
    for read in sent.iter().rev() {
        if batches == unconfirmed {
            break;
        }
        reads += 1;
        if read.messages > 0 {
            batches += 1;
        }
    }
    reads
}

impl SinkWorker {
    pub async fn run(mut self) -> Result<(), WorkerError> {
        // A receiver that never completes the handshake must not hold up a
        // shutdown or reload.
        let mut mode = self.mode.clone();
        tokio::select! {
            () = self.transport.warm_up() => {}
            _ = mode.wait_for(|m| *m != WorkerMode::Run) => {}
        }
        let mut batch = Batch::default();
        let mut delivered_since_idle = false;
        let mut store_backoff = Backoff::new(self.retry_initial, self.retry_max);
        'read: loop {
            // Settle what the receiver confirmed since the last round, or
            // read again what a lost connection took.
            if let Err(source) = self.settle_confirmed().await {
                if self.store_failed(source, &mut store_backoff).await? {
                    return Ok(());
                }
                continue;
            }
            if self.max_attempts.is_some_and(|max| self.rewinds >= max) {
                return Err(self.unconfirmed_error(
                    "it closed or reset the connection before confirming them, at every attempt; if it resets connections by design, set confirm = \"tcp-ack\" for this sink",
                ));
            }
            // Read the mode before the outbox: Drain is set only after the
            // pollers stopped queuing, so an empty read after seeing Drain
            // really means there is nothing left.
            let mode = self.current_mode();
            let entries = match self.next_entries() {
                Ok(entries) => entries,
                Err(source) => {
                    let delay = store_backoff.next_delay(None);
                    if let Some(suppressed) = crate::telemetry::should_log(&format!("outbox read {}: {source}", self.name)) {
                        tracing::error!(sink = %self.name, error = %source, suppressed, "cannot read the outbox; retrying");
                    }
                    if self.max_attempts.is_some() {
                        return Err(WorkerError::Store { sink: self.name.clone(), source });
                    }
                    if self.sleep_or_stop(delay).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            if entries.is_empty() {
                if mode != WorkerMode::Run {
                    if self.sent.is_empty() {
                        return Ok(());
                    }
                    self.finish().await?;
                    continue;
                }
                if delivered_since_idle {
                    // A worker faster than the poller catches up after every
                    // queued batch. Its buffers are kept while batches keep
                    // coming, because returning pages to the kernel and
                    // faulting them in again costs more than the batch.
                    // Only a pause gives their memory back. A wake-up that
                    // brings nothing to read starts the wait again.
                    match tokio::time::timeout(MEMORY_RELEASE_DELAY, self.wait_for_work()).await {
                        Ok(true) => return self.exit_idle().await,
                        Ok(false) => continue,
                        Err(_) => {
                            // The batch buffer has grown to the largest batch sent.
                            batch = Batch::default();
                            self.store.forget_delivered_batches();
                            super::release_free_memory();
                            delivered_since_idle = false;
                        }
                    }
                }
                if self.wait_for_work().await {
                    return self.exit_idle().await;
                }
                continue;
            }
            delivered_since_idle = true;
            let mut prepared = self.prepare(&entries, &mut batch);
            let mut split = false;
            // After several detections in a row were rejected alone, the
            // receiver may reject everything: one detection goes at a time
            // until one is delivered (see [`BISECT_GIVE_UP`]).
            if self.rejected_alone >= BISECT_GIVE_UP && batch.len() > 1 {
                keep_first(&mut batch, &mut prepared, 1);
            }
            let outcome = loop {
                if batch.is_empty() {
                    break SendOutcome::Delivered;
                }
                match self.deliver(&batch).await? {
                    // A receiver that rejects a batch without naming a
                    // detection may object to one detection only: the
                    // batch is sent in halves until the rejected part is a
                    // single detection, so the others are not dead-lettered.
                    Delivery::Done(SendOutcome::AllRejected { reason }) if batch.len() > 1 => {
                        // A half that the receiver takes shows nothing of its size limit.
                        split = false;
                        self.bisect_rejected(&mut batch, &mut prepared, &reason);
                    }
                    Delivery::Done(outcome) => {
                        match &outcome {
                            SendOutcome::AllRejected { .. } => self.rejected_alone += 1,
                            SendOutcome::Rejected { delivered: 0, .. } => {}
                            SendOutcome::Delivered | SendOutcome::Rejected { .. } => self.rejected_alone = 0,
                        }
                        if split && matches!(outcome, SendOutcome::Delivered) {
                            self.learn_batch_limit(batch.bytes().len());
                        }
                        break outcome;
                    }
                    Delivery::TooLarge(error) => {
                        split = true;
                        self.split_batch(&mut batch, &mut prepared, &error);
                    }
                    Delivery::Rewind => continue 'read,
                    Delivery::Stopped => return Err(self.stopped_error()),
                }
            };
            if let Err(source) = self.settle_and_ack(&entries, &prepared, outcome).await {
                // The batch is delivered but the cursor did not move. The
                // read stays among those sent, and the next round tries
                // to store it again.
                if self.store_failed(source, &mut store_backoff).await? {
                    return Ok(());
                }
                continue;
            }
            store_backoff.reset();
        }
    }

    /// Logs a failed cursor write and waits before the next round. Returns
    /// true when the worker should exit.
    async fn store_failed(&mut self, source: StoreError, backoff: &mut Backoff) -> Result<bool, WorkerError> {
        if let Some(suppressed) = crate::telemetry::should_log(&format!("cursor {}: {source}", self.name)) {
            tracing::error!(sink = %self.name, error = %source, suppressed, "cannot store the sink cursor");
        }
        if self.max_attempts.is_some() {
            return Err(WorkerError::Store { sink: self.name.clone(), source });
        }
        Ok(self.sleep_or_stop(backoff.next_delay(None)).await)
    }

    /// Returns the detections queued for this sink, for an error message.
    fn pending(&self) -> usize {
        self.store.pending(&self.name).map(|(n, _)| n).unwrap_or(0)
    }

    fn stopped_error(&self) -> WorkerError {
        WorkerError::Stopped { sink: self.name.clone(), pending: self.pending() }
    }

    fn unconfirmed_error(&self, cause: &'static str) -> WorkerError {
        WorkerError::Unconfirmed { sink: self.name.clone(), pending: self.pending(), cause }
    }

    /// Exits a worker that waited for work. Reads still waiting for the
    /// receiver are confirmed first, unless the mode is Stop.
    async fn exit_idle(&mut self) -> Result<(), WorkerError> {
        if self.sent.is_empty() {
            return Ok(());
        }
        if self.current_mode() == WorkerMode::Stop {
            return Err(self.unconfirmed_error("the shutdown grace period ended before it closed the connection"));
        }
        self.finish().await?;
        if let Err(source) = self.settle_confirmed().await {
            return Err(WorkerError::Store { sink: self.name.clone(), source });
        }
        match self.sent.is_empty() {
            true => Ok(()),
            false => Err(self.unconfirmed_error("it closed or reset the connection before confirming them")),
        }
    }

    /// Closes the connection at the end of a drain, so that the receiver
    /// confirms reading the batches it has not confirmed yet. A receiver
    /// that resets the connection gets them again in the next rounds.
    /// The caller settles what the receiver confirmed.
    async fn finish(&mut self) -> Result<(), WorkerError> {
        let mut mode = self.mode.clone();
        let finished = tokio::select! {
            biased;
            () = wait_for_stop(&mut mode) => None,
            finished = self.transport.finish() => Some(finished),
        };
        match finished {
            Some(Finish::Read | Finish::Lost) => Ok(()),
            Some(Finish::NoAnswer) => Err(self.unconfirmed_error(
                "it did not close its side of the connection within write_timeout_secs after the sink closed its own; if it keeps connections open by design, set confirm = \"tcp-ack\" for this sink",
            )),
            None => Err(self.unconfirmed_error("the shutdown grace period ended before it closed the connection")),
        }
    }

    fn current_mode(&self) -> WorkerMode {
        *self.mode.borrow()
    }

    /// Reads the entries after the last read sent, or after the cursor.
    fn next_entries(&self) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let after = match self.sent.iter().rev().find_map(|read| read.position) {
            Some(position) => position,
            None => self.store.cursor(&self.name)?.unwrap_or(0),
        };
        self.store.read_after(after, self.batch_size)
    }

    /// Waits for new entries or a mode change; true when the worker should exit.
    ///
    /// A switch to `Drain` returns false, so the caller reads the outbox once
    /// more: entries queued just before the switch arrive together with it,
    /// and `select!` may see the mode change first.
    /// While reads wait for the receiver to confirm them, a pause of
    /// [`IDLE_CLOSE_DELAY`] closes the connection to have them confirmed,
    /// and returns false, so the caller settles them.
    async fn wait_for_work(&mut self) -> bool {
        let close = tokio::time::sleep(IDLE_CLOSE_DELAY);
        tokio::pin!(close);
        loop {
            tokio::select! {
                changed = self.wake.changed() => return changed.is_err(),
                changed = self.mode.changed() => return changed.is_err() || *self.mode.borrow() == WorkerMode::Stop,
                // An idle connection the receiver closes or resets.
                () = self.transport.readable() => {
                    if self.transport.check_connection().await {
                        return false;
                    }
                }
                () = &mut close, if !self.sent.is_empty() && self.transport.confirms_by_close() => {
                    let mut mode = self.mode.clone();
                    tokio::select! {
                        _ = self.transport.finish() => {}
                        () = wait_for_stop(&mut mode) => {}
                    }
                    return false;
                }
            }
        }
    }

    /// Sleeps for `delay`. Returns true when the mode changed to Stop meanwhile.
    async fn sleep_or_stop(&mut self, delay: Duration) -> bool {
        let mut mode = self.mode.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = mode.wait_for(|m| *m == WorkerMode::Stop) => true,
        }
    }

    /// Routes and encodes entries into `batch` until it is full, dead-lettering
    /// the entries that cannot be encoded.
    fn prepare(&mut self, entries: &[(u64, OutboxEntry)], batch: &mut Batch) -> Prepared {
        batch.clear();
        let now = Utc::now();
        let mut prepared = Prepared::default();
        for (index, (_, entry)) in entries.iter().enumerate() {
            if entry.only_sink().is_some_and(|only| only != self.name) {
                prepared.consumed = index + 1;
                continue;
            }
            // Routing comes before the field check, so a detection this sink
            // does not take never becomes its dead letter.
            let mut checked = None;
            let usable = match validated(entry, &mut checked) {
                Ok(detection) if !self.routed(detection, entry.tenant()) => {
                    prepared.consumed = index + 1;
                    continue;
                }
                Ok(detection) => field_problem(detection, self.encoder.needs_fields()).map_or(Ok(detection), Err),
                Err(error) => Err(error),
            };
            let detection = match usable {
                Ok(detection) => detection,
                Err(error) => {
                    prepared.unencodable.push((index, format!("cannot encode: {error}")));
                    prepared.consumed = index + 1;
                    continue;
                }
            };
            let added = self.add_message(detection, now, batch);
            match added {
                Added::Message => {
                    prepared.message_entries.push(index);
                    prepared.consumed = index + 1;
                }
                Added::BatchFull => break,
            }
        }
        self.report_shortened();
        prepared
    }

    /// Adds the messages shortened since the last call to the metric.
    fn report_shortened(&mut self) {
        let metrics = &crate::telemetry::global().metrics;
        for (count, lost) in self.unreported_shortened.iter_mut().zip(["optional", "full_id"]) {
            if *count > 0 {
                metrics.add(&crate::telemetry::SHORTENED, &[("sink", &self.name), ("lost", lost)], *count as f64);
                *count = 0;
            }
        }
    }

    /// Returns whether this sink's routing takes the detection.
    fn routed(&self, detection: &Detection, tenant: &str) -> bool {
        if self.routing.filters_fields() {
            let severity = detection.text("Severity");
            let category = detection.text("Category");
            self.routing.routes(tenant, severity.as_deref(), category.as_deref())
        } else {
            self.routing.routes(tenant, None, None)
        }
    }

    /// Encodes one routed detection into `batch`.
    fn add_message(&mut self, detection: &Detection, now: chrono::DateTime<Utc>, batch: &mut Batch) -> Added {
        let outcome = self.encoder.encode(detection, now, batch.buffer());
        batch.end_message();
        // A full batch ends before the message that overflows it, unless
        // that message is the first: it is then sent alone.
        let max_bytes = self.transport.max_batch_bytes().map(|max| match self.receiver_max_batch_bytes {
            Some(found) => found.min(max),
            None => max,
        });
        if max_bytes.is_some_and(|max| batch.bytes().len() > max) && batch.len() > 1 {
            batch.pop_message();
            return Added::BatchFull;
        }
        if outcome.shortened {
            self.shortened += 1;
            self.unreported_shortened[usize::from(outcome.full_id_cut)] += 1;
            let full_id = || loggable_full_id(&detection.full_id().unwrap_or_default());
            if outcome.full_id_cut {
                // The receiver cannot match such an event to its detection,
                // so it is a WARN with the FullId, one line a minute per sink.
                if let Some(suppressed) = crate::telemetry::should_log(&format!("full id cut {}", self.name)) {
                    tracing::warn!(
                        sink = %self.name,
                        full_id = %full_id(),
                        shortened_total = self.shortened,
                        suppressed,
                        "event shortened to fit max_datagram_bytes lost its FullId; raise max_datagram_bytes or use TCP or TLS"
                    );
                }
            } else {
                tracing::debug!(
                    sink = %self.name,
                    full_id = %full_id(),
                    shortened_total = self.shortened,
                    "event shortened to fit the maximum message size"
                );
            }
        }
        Added::Message
    }

    /// Keeps the first half of a batch that the receiver rejected as too
    /// large, so that half is sent next and the rest is read again in the
    /// next round.
    fn split_batch(&mut self, batch: &mut Batch, prepared: &mut Prepared, error: &SinkError) {
        let rejected_events = batch.len();
        let rejected_bytes = batch.bytes().len();
        let keep = keep_first_half(batch, prepared);
        if let Some(suppressed) = crate::telemetry::should_log(&format!("too large {}", self.name)) {
            tracing::warn!(
                sink = %self.name,
                rejected_events,
                rejected_bytes,
                next_events = keep,
                next_bytes = batch.bytes().len(),
                error = %error,
                suppressed,
                "receiver rejected the batch as too large; sending it in smaller parts"
            );
        }
    }

    /// Keeps the first half of a batch that the receiver rejected for good
    /// without naming a detection, so that half is sent next and the rest
    /// is read again in the next round.
    fn bisect_rejected(&mut self, batch: &mut Batch, prepared: &mut Prepared, reason: &str) {
        let rejected_events = batch.len();
        let keep = keep_first_half(batch, prepared);
        if let Some(suppressed) = crate::telemetry::should_log(&format!("bisect {}", self.name)) {
            tracing::warn!(
                sink = %self.name,
                rejected_events,
                next_events = keep,
                reason = %reason,
                suppressed,
                "receiver rejected the batch without naming a detection; sending it in halves, so only the detections it rejects alone become dead letters"
            );
        }
    }

    /// Remembers that the receiver accepted a batch part of `bytes` after a
    /// split, so later batches stay within the largest such part. A part
    /// that is rejected, such as one detection too large alone, teaches
    /// nothing, so it cannot shrink every later batch.
    fn learn_batch_limit(&mut self, bytes: usize) {
        let limit = self.receiver_max_batch_bytes.map_or(bytes, |known| known.max(bytes));
        if self.receiver_max_batch_bytes == Some(limit) {
            return;
        }
        self.receiver_max_batch_bytes = Some(limit);
        tracing::warn!(
            sink = %self.name,
            accepted_bytes = limit,
            "receiver accepted a part of {limit} bytes after rejecting a larger batch as too large; later batches of this sink stay within that size until it restarts. Set max_batch_bytes to {limit} or less to save the rejected requests"
        );
    }

    /// Adds a read just sent to those waiting for the receiver, then
    /// settles the ones it confirmed (see [`SinkWorker::settle_confirmed`]).
    async fn settle_and_ack(&mut self, entries: &[(u64, OutboxEntry)], prepared: &Prepared, outcome: SendOutcome) -> Result<(), StoreError> {
        let settlement = self.settle(entries, prepared, &outcome);
        self.sent.push_back(settlement);
        self.settle_confirmed().await
    }

    /// Settles the reads the receiver confirmed: stores their dead letters
    /// and moves the cursor past them, in one store transaction. When that
    /// fails, neither is stored and the reads stay, so the retry adds no
    /// second copy of a letter. The dead letters are logged once the
    /// transaction is committed.
    ///
    /// Reads a lost connection took are dropped first, so the next read
    /// starts after the last confirmed one and sends them again.
    async fn settle_confirmed(&mut self) -> Result<(), StoreError> {
        let lost = self.transport.take_lost();
        let waiting = waiting_reads(&self.sent, if lost > 0 { lost } else { self.transport.unconfirmed() });
        let confirmed = self.sent.len() - waiting;
        if lost > 0 {
            self.sent.truncate(confirmed);
            self.rewinds += 1;
            tracing::warn!(
                sink = %self.name,
                batches = lost,
                "the connection was lost before the receiver confirmed that it read the last batches; sending them again from the outbox, so it may get some twice"
            );
        }
        if confirmed == 0 {
            return Ok(());
        }
        let Some(position) = self.sent.iter().take(confirmed).filter_map(|read| read.position).next_back() else {
            self.count_forwarded(confirmed);
            return Ok(());
        };
        let letters: Vec<(&OutboxEntry, &str)> =
            self.sent.iter().take(confirmed).flat_map(|read| read.dead_letters.iter().map(|(entry, reason)| (entry, reason.as_str()))).collect();
        let acked = self.store.ack_with_dead_letters(&self.name, position, &letters).await;
        // The commit comes before the release and the flush, so a failure
        // there still leaves the letters stored.
        if acked.is_ok() || self.store.cursor(&self.name).ok().flatten() == Some(position) {
            for read in self.sent.iter().take(confirmed) {
                for notice in &read.notices {
                    notice.log(&self.name);
                }
            }
            self.count_forwarded(confirmed);
            self.rewinds = 0;
            self.close_backoff.reset();
        }
        acked.map(drop)
    }

    /// Removes the oldest `reads`, settled, and adds their acknowledged
    /// messages to the forwarded metric.
    fn count_forwarded(&mut self, reads: usize) {
        let acknowledged: usize = self.sent.drain(..reads).map(|read| read.acknowledged).sum();
        if acknowledged > 0 {
            crate::telemetry::global().metrics.add(&crate::telemetry::FORWARDED, &[("sink", &self.name)], acknowledged as f64);
        }
    }

    /// Returns where the cursor may move and the entries it passes that
    /// become dead letters: those the receiver rejected and those this sink
    /// cannot encode.
    fn settle(&self, entries: &[(u64, OutboxEntry)], prepared: &Prepared, outcome: &SendOutcome) -> Settlement {
        let mut dead_letters = Vec::new();
        let mut notices = Vec::new();
        let through = self.settle_messages(entries, prepared, outcome, &mut dead_letters, &mut notices);
        for (index, reason) in prepared.unencodable.iter().filter(|(index, _)| *index < through) {
            let entry = &entries[*index].1;
            notices.push(Notice::Unencodable { tenant: entry.tenant().to_string(), reason: reason.clone() });
            dead_letters.push((entry.clone(), reason.clone()));
        }
        let messages = prepared.message_entries.len();
        let acknowledged = match outcome {
            SendOutcome::Delivered => messages,
            SendOutcome::AllRejected { .. } => 0,
            SendOutcome::Rejected { delivered, .. } => *delivered,
        };
        Settlement { position: through.checked_sub(1).map(|i| entries[i].0), dead_letters, notices, messages, acknowledged }
    }

    /// Adds what the receiver rejected to `dead_letters` and returns how
    /// many entries of the read the cursor may move past.
    fn settle_messages(
        &self,
        entries: &[(u64, OutboxEntry)],
        prepared: &Prepared,
        outcome: &SendOutcome,
        dead_letters: &mut Vec<(OutboxEntry, String)>,
        notices: &mut Vec<Notice>,
    ) -> usize {
        match outcome {
            SendOutcome::Delivered => prepared.consumed,
            SendOutcome::AllRejected { reason } => {
                notices.push(Notice::BatchRejected { events: prepared.message_entries.len(), reason: reason.clone() });
                for &index in &prepared.message_entries {
                    dead_letters.push((entries[index].1.clone(), reason.clone()));
                }
                prepared.consumed
            }
            SendOutcome::Rejected { delivered, reason } => {
                let Some(&rejected) = prepared.message_entries.get(*delivered) else {
                    tracing::warn!(sink = %self.name, delivered, reason = %reason, "receiver rejected a message the batch does not have; counting the batch as delivered");
                    return prepared.consumed;
                };
                let entry = &entries[rejected].1;
                notices.push(Notice::OneRejected { tenant: entry.tenant().to_string(), delivered: *delivered, reason: reason.clone() });
                dead_letters.push((entry.clone(), reason.clone()));
                // Entries up to the next message were filtered out or cannot
                // be encoded (dead-lettered by the caller), so the cursor
                // may pass them too.
                match prepared.message_entries.get(delivered + 1) {
                    Some(&next) => next,
                    None => prepared.consumed,
                }
            }
        }
    }

    async fn deliver(&mut self, batch: &Batch) -> Result<Delivery, WorkerError> {
        let mut backoff = Backoff::new(self.retry_initial, self.retry_max);
        let mut attempt = 1u32;
        loop {
            if self.current_mode() == WorkerMode::Stop {
                return Ok(Delivery::Stopped);
            }
            // The grace period may end while a send waits on a receiver
            // that does not read, so the send races the switch to Stop.
            let mut mode = self.mode.clone();
            let sent = tokio::select! {
                biased;
                sent = self.transport.send(batch) => sent,
                () = wait_for_stop(&mut mode) => {
                    // The receiver may hold part of the batch, so the
                    // connection cannot carry another one. The batch stays
                    // unacknowledged in the outbox and is sent after the next start.
                    self.transport.close_connection();
                    tracing::warn!(sink = %self.name, events = batch.len(), attempt, "shutdown grace period over during a send; the batch stays queued");
                    return Ok(Delivery::Stopped);
                }
            };
            match sent {
                Ok(outcome) => {
                    if attempt > 1 {
                        tracing::info!(sink = %self.name, attempt, "delivery recovered");
                    }
                    return Ok(Delivery::Done(outcome));
                }
                // The receiver lost batches delivered before this one: they
                // are read again first, and the round that does logs it.
                Err(SinkError::LostUnread { .. }) => return Ok(Delivery::Rewind),
                Err(source) => {
                    crate::telemetry::global().metrics.add(&crate::telemetry::SINK_ERRORS, &[("sink", &self.name)], 1.0);
                    // The transport rejects a single message that is too large itself.
                    if source.payload_too_large() && batch.len() > 1 {
                        return Ok(Delivery::TooLarge(source));
                    }
                    if self.max_attempts.is_some_and(|max| attempt >= max) {
                        return Err(WorkerError::Send { sink: self.name.clone(), source });
                    }
                    // A receiver that does not confirm by its close gets the
                    // batches again after each failure: the delay grows over
                    // the sends between them until one is confirmed.
                    let delay = match &source {
                        SinkError::CloseUnconfirmed { .. } => self.close_backoff.next_delay(None),
                        _ => backoff.next_delay(source.retry_after()),
                    };
                    // A repeat of an error logged recently is counted, not printed.
                    if let Some(suppressed) = crate::telemetry::should_log(&format!("delivery {}: {source}", self.name)) {
                        let events = batch.len();
                        let retry_in_ms = delay.as_millis() as u64;
                        if source.needs_operator() {
                            tracing::error!(sink = %self.name, attempt, retry_in_ms, events, error = %source, suppressed, "delivery failed and needs an operator to act; retrying");
                        } else {
                            tracing::warn!(sink = %self.name, attempt, retry_in_ms, events, error = %source, suppressed, "delivery failed; retrying");
                        }
                    }
                    if self.sleep_or_stop(delay).await {
                        return Ok(Delivery::Stopped);
                    }
                    // The batch goes again after those the lost connection took.
                    if self.transport.lost_pending() {
                        return Ok(Delivery::Rewind);
                    }
                    attempt += 1;
                }
            }
        }
    }
}

/// Returns the entry's detection, or why it is not one. An entry the poller
/// did not check (a requeued dead letter) is checked here, into `checked`.
fn validated<'e>(entry: &'e OutboxEntry, checked: &'e mut Option<Detection>) -> Result<&'e Detection, String> {
    if entry.checked() {
        return Ok(entry.detection());
    }
    let detection = Detection::from_string(entry.raw().to_string()).map_err(|(_, e)| e.to_string())?;
    Ok(checked.insert(detection))
}

/// Returns why an encoder that reads fields (`needs_fields`, CEF and LEEF)
/// cannot encode the detection, if it cannot. Other encoders get `None` at
/// once, because the check builds the field table (once for every sink
/// that reads the entry).
fn field_problem(detection: &Detection, needs_fields: bool) -> Option<String> {
    if !needs_fields {
        return None;
    }
    let error = detection.field_error()?;
    Some(format!("its fields cannot be parsed ({error}), so this format would lose them; JSON sinks forward it unchanged"))
}

/// Completes when `mode` turns to [`WorkerMode::Stop`]. Never completes when
/// the pipeline dropped the sender, because no Stop can come then.
async fn wait_for_stop(mode: &mut watch::Receiver<WorkerMode>) {
    if mode.wait_for(|m| *m == WorkerMode::Stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The longest FullId written whole to a log line, in characters.
const LOGGED_FULL_ID_CHARS: usize = 256;

/// Returns a FullId for a log line: control, line-breaking and
/// direction-changing characters escaped, so a hostile FullId cannot forge
/// lines, and cut after [`LOGGED_FULL_ID_CHARS`] characters with its length.
fn loggable_full_id(full_id: &str) -> String {
    match full_id.char_indices().nth(LOGGED_FULL_ID_CHARS) {
        Some((end, _)) => format!("{}... ({} bytes)", crate::output::printable(&full_id[..end]), full_id.len()),
        None => crate::output::printable(full_id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued_entry(store: &Store, raw: &str) -> OutboxEntry {
        let detection = Detection::from_json_text(raw).unwrap();
        store.enqueue_blocking("t", vec![detection], None, Utc::now()).unwrap();
        store.read_after(0, 1).unwrap().remove(0).1
    }

    /// Shortened messages reach the metric once per prepared batch, by
    /// whether their FullId arrived whole.
    #[test]
    fn shortened_messages_counted_per_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let texts = [
            format!(r#"{{"FullId":"s:1","Severity":"High","Description":"{}"}}"#, "d".repeat(2000)),
            format!(r#"{{"FullId":"s:2{}","Severity":"High"}}"#, "9".repeat(2000)),
            r#"{"FullId":"s:3","Severity":"High"}"#.to_string(),
        ];
        let detections = texts.iter().map(|text| Detection::from_json_text(text).unwrap()).collect();
        store.enqueue_blocking("t", detections, None, Utc::now()).unwrap();
        let mut worker = routed_worker(store.clone(), crate::format::PayloadFormat::Cef);
        worker.name = "shortening-metric".into();
        worker.encoder = EventEncoder::Wire(test_encoder(crate::format::PayloadFormat::Cef, Some(480)));

        let entries = store.read_after(0, 10).unwrap();
        let prepared = worker.prepare(&entries, &mut Batch::default());
        assert_eq!(prepared.message_entries, [0, 1, 2]);

        let metrics = &crate::telemetry::global().metrics;
        let count = |lost| metrics.value(&crate::telemetry::SHORTENED, &[("sink", "shortening-metric"), ("lost", lost)]);
        assert_eq!(count("optional"), Some(1.0));
        assert_eq!(count("full_id"), Some(1.0));
        assert_eq!(worker.unreported_shortened, [0, 0]);
    }

    /// A FullId in a log line cannot forge a line or reorder text, and a
    /// long one is cut with its length.
    #[test]
    fn logged_full_id_is_escaped_and_capped() {
        let forged = "a\n2026-12-05T00:00:00Z ERROR forged\r\u{1b}[31m\u{202e}b";
        let logged = loggable_full_id(forged);
        assert_eq!(logged, "a\\n2026-12-05T00:00:00Z ERROR forged\\r\\u{1b}[31m\\u{202e}b");
        assert_eq!(loggable_full_id("da:1"), "da:1");
        let long = "9".repeat(600);
        assert_eq!(loggable_full_id(&long), format!("{}... (600 bytes)", "9".repeat(256)));
    }

    #[test]
    fn raw_json_encoder_builds_no_field_table() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entry = queued_entry(&store, r#"{"FullId":"a:1","Severity":"High"}"#);
        let mut checked = None;
        let detection = validated(&entry, &mut checked).unwrap();
        assert_eq!(field_problem(detection, false), None);
        assert!(!detection.field_table_built());
        assert_eq!(field_problem(detection, true), None);
        assert!(detection.field_table_built());
    }

    /// Keeps tests that log dead-letter notices from running at once. A log
    /// call site first reached on a thread without a subscriber, while
    /// another thread registers it, can stay disabled for the test that
    /// captures its log (it then missed the notice in about one run in
    /// three).
    fn settling_alone() -> std::sync::MutexGuard<'static, ()> {
        static SETTLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        SETTLING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Returns an encoder without a syslog header, with newline framing and
    /// `max_message_bytes`.
    fn test_encoder(payload: crate::format::PayloadFormat, max_message_bytes: Option<usize>) -> Encoder {
        use crate::format::{CefOptions, EncoderOptions, Facility, Framing, HeaderFormat, LeefOptions};
        Encoder::new(EncoderOptions {
            payload,
            header: HeaderFormat::None,
            framing: Framing::Newline,
            facility: Facility::LOCAL0,
            hostname: "collector01".to_owned(),
            app_name: "mde-forwarder".to_owned(),
            cef: CefOptions::default(),
            leef: LeefOptions::default(),
            max_message_bytes,
        })
    }

    fn routed_worker(store: Arc<Store>, payload: crate::format::PayloadFormat) -> SinkWorker {
        let encoder = test_encoder(payload, None);
        let routing = SinkCommon { min_severity: crate::config::SeverityLevel::High, ..SinkCommon::default() };
        SinkWorker {
            name: "high".into(),
            store,
            transport: Transport::Stdout,
            encoder: EventEncoder::Wire(encoder),
            routing,
            shortened: 0,
            unreported_shortened: [0; 2],
            receiver_max_batch_bytes: None,
            rejected_alone: 0,
            sent: Default::default(),
            rewinds: 0,
            close_backoff: Backoff::new(Duration::from_millis(10), Duration::from_secs(1)),
            batch_size: 10,
            retry_initial: Duration::from_millis(10),
            retry_max: Duration::from_millis(10),
            max_attempts: Some(1),
            wake: watch::channel(0).1,
            mode: watch::channel(WorkerMode::Run).1,
        }
    }

    /// Two detections whose field tables fail on a lone surrogate, in a
    /// value and in a name: one High, one Low, for a sink that takes High
    /// only.
    fn broken_table_entries(store: &Store) -> Vec<(u64, OutboxEntry)> {
        let texts = [
            r#"{"FullId":"a:1","Severity":"High","Title":"x\ud800"}"#,
            r#"{"FullId":"b:1","Severity":"Low","Tit\ud800le":"x"}"#,
        ];
        let detections = texts.iter().map(|text| Detection::from_json_text(text).unwrap()).collect();
        store.enqueue_blocking("t", detections, None, Utc::now()).unwrap();
        store.read_after(0, 10).unwrap()
    }

    /// Prepares [`broken_table_entries`] for a High-only sink of `payload`,
    /// and settles the batch as delivered.
    async fn prepare_broken_tables(payload: crate::format::PayloadFormat) -> (tempfile::TempDir, Arc<Store>, Prepared) {
        let _settling = settling_alone();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let entries = broken_table_entries(&store);
        let mut worker = routed_worker(store.clone(), payload);
        let prepared = worker.prepare(&entries, &mut Batch::default());
        worker.settle_and_ack(&entries, &prepared, SendOutcome::Delivered).await.unwrap();
        assert_eq!(store.cursor("high").unwrap(), Some(entries[1].0), "the cursor passes both entries");
        (dir, store, prepared)
    }

    /// A batch whose send fails is prepared again. Its detections that
    /// cannot be encoded become dead letters once, when the cursor passes
    /// them, not each time the batch is prepared.
    #[tokio::test]
    async fn failed_sends_dead_letter_once() {
        let _settling = settling_alone();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let entries = broken_table_entries(&store);
        let mut worker = routed_worker(store.clone(), crate::format::PayloadFormat::Cef);
        for _ in 0..3 {
            // Each of these sends failed, so the batch was never settled.
            worker.prepare(&entries, &mut Batch::default());
        }
        assert_eq!(store.dead_letter_count(), 0, "nothing is stored before the cursor moves");
        let prepared = worker.prepare(&entries, &mut Batch::default());
        worker.settle_and_ack(&entries, &prepared, SendOutcome::Delivered).await.unwrap();
        assert_eq!(store.dead_letter_count(), 1);
    }

    /// A batch rejected for good whose cursor write fails stays among the
    /// reads sent, and the next round stores it: each of its detections
    /// becomes one dead letter.
    #[tokio::test]
    async fn failed_ack_stores_letters_once() {
        let _settling = settling_alone();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        store.sync_cursors(&["high"]).unwrap();
        let texts = [
            r#"{"FullId":"a:1","Severity":"High"}"#,
            r#"{"FullId":"b:1","Severity":"High","Title":"x\ud800"}"#,
            r#"{"FullId":"c:1","Severity":"High"}"#,
        ];
        let detections = texts.iter().map(|text| Detection::from_json_text(text).unwrap()).collect();
        store.enqueue_blocking("t", detections, None, Utc::now()).unwrap();
        let mut worker = routed_worker(store.clone(), crate::format::PayloadFormat::Cef);
        let rejected = SendOutcome::AllRejected { reason: "HTTP 400: bad event".into() };

        let log = CapturedLog::default();
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::fmt().with_writer(log.clone()).with_ansi(false).finish());

        store.fail_next_write();
        let entries = store.read_after(0, 10).unwrap();
        let prepared = worker.prepare(&entries, &mut Batch::default());
        assert_eq!(prepared.message_entries, [0, 2]);
        assert!(worker.settle_and_ack(&entries, &prepared, rejected).await.is_err());
        assert_eq!(store.cursor("high").unwrap(), Some(0), "the cursor did not move");
        assert_eq!(store.dead_letter_count(), 0, "and no letter is stored without it");

        // The next round of the worker's loop stores the read it kept.
        worker.settle_confirmed().await.unwrap();
        assert_eq!(store.cursor("high").unwrap(), Some(entries[2].0));
        let mut ids: Vec<String> =
            store.dead_letters().unwrap().iter().map(|l| Detection::from_json_text(&l.detection).unwrap().full_id().unwrap().into_owned()).collect();
        ids.sort();
        assert_eq!(ids, ["a:1", "b:1", "c:1"], "one letter per detection");
        let text = log.text();
        assert_eq!(text.matches("receiver rejected the batch").count(), 1, "logged once, when stored: {text}");
        assert_eq!(text.matches("detection moved to dead letters").count(), 1, "{text}");
    }

    /// Log output kept in memory, for checking what a test logged.
    #[derive(Clone, Default)]
    struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

    impl CapturedLog {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl std::io::Write for CapturedLog {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLog {
        type Writer = CapturedLog;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[tokio::test]
    async fn routing_reads_severity_of_broken_tables() {
        let (_dir, store, prepared) = prepare_broken_tables(crate::format::PayloadFormat::Json).await;
        assert_eq!(prepared.message_entries, [0], "the High detection is sent, the Low one is not");
        assert_eq!(prepared.consumed, 2);
        assert_eq!(store.dead_letter_count(), 0);
    }

    #[tokio::test]
    async fn unrouted_detections_never_become_dead_letters() {
        let (_dir, store, prepared) = prepare_broken_tables(crate::format::PayloadFormat::Cef).await;
        assert!(prepared.message_entries.is_empty());
        assert_eq!(prepared.consumed, 2);
        let letters = store.dead_letters().unwrap();
        assert_eq!(letters.len(), 1, "only the High detection, which this sink takes");
        assert!(letters[0].detection.contains("a:1"), "{}", letters[0].detection);
    }

    #[test]
    fn unparsable_fields_fail_only_field_encoders() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let entry = queued_entry(&store, r#"{"FullId":"a:1","Title":"x\ud800y"}"#);
        let mut checked = None;
        let detection = validated(&entry, &mut checked).unwrap();
        assert_eq!(field_problem(detection, false), None);
        let error = field_problem(detection, true).unwrap();
        assert!(error.contains("fields cannot be parsed"), "{error}");
    }
}
