//! One sink's delivery loop: read the outbox after the sink's cursor, encode,
//! send, and move the cursor only once the transport acknowledged the batch.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;

use crate::detection::Detection;
use crate::format::Encoder;
use crate::retry::Backoff;
use crate::sink::{Batch, SinkError, Transport};
use crate::store::{OutboxEntry, Store, StoreError};

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
    #[error("sink {sink}: stopped with {pending} detections still queued; they are sent after the next start")]
    Stopped { sink: String, pending: usize },
}

pub struct SinkWorker {
    pub(crate) name: String,
    pub(crate) store: Arc<Store>,
    pub(crate) transport: Transport,
    pub(crate) encoder: Encoder,
    pub(crate) batch_size: usize,
    pub(crate) retry_initial: Duration,
    pub(crate) retry_max: Duration,
    /// Attempts per batch before giving up; `None` retries forever (daemon).
    pub(crate) max_attempts: Option<u32>,
    pub(crate) wake: watch::Receiver<u64>,
    pub(crate) mode: watch::Receiver<WorkerMode>,
}

enum Delivery {
    Done,
    Stopped,
}

impl SinkWorker {
    pub async fn run(mut self) -> Result<(), WorkerError> {
        let mut batch = Batch::default();
        let mut store_backoff = Backoff::new(self.retry_initial, self.retry_max);
        loop {
            let entries = match self.next_entries() {
                Ok(entries) => entries,
                Err(source) => {
                    let delay = store_backoff.next_delay(None);
                    tracing::error!(sink = %self.name, error = %source, "cannot read the outbox; retrying");
                    if self.max_attempts.is_some() {
                        return Err(WorkerError::Store { sink: self.name.clone(), source });
                    }
                    if self.sleep_or_stop(delay).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            let Some((last_seq, _)) = entries.last().map(|(seq, e)| (*seq, e)) else {
                if self.current_mode() != WorkerMode::Run || self.wait_for_work().await {
                    return Ok(());
                }
                continue;
            };
            self.encode(&entries, &mut batch);
            if !batch.is_empty() {
                if let Delivery::Stopped = self.deliver(&batch).await? {
                    let pending = self.store.pending(&self.name).map(|(n, _)| n).unwrap_or(0);
                    return Err(WorkerError::Stopped { sink: self.name.clone(), pending });
                }
            }
            let acked = self.store.set_cursor(&self.name, last_seq).and_then(|_| self.store.release());
            if let Err(source) = acked {
                // The batch is delivered but the cursor may not be stored: it
                // may be sent again after a restart, never lost.
                tracing::error!(sink = %self.name, error = %source, "cannot store the sink cursor");
                if self.max_attempts.is_some() {
                    return Err(WorkerError::Store { sink: self.name.clone(), source });
                }
            }
            store_backoff.reset();
        }
    }

    fn current_mode(&self) -> WorkerMode {
        *self.mode.borrow()
    }

    fn next_entries(&self) -> Result<Vec<(u64, OutboxEntry)>, StoreError> {
        let cursor = self.store.cursor(&self.name)?.unwrap_or(0);
        self.store.read_after(cursor, self.batch_size)
    }

    /// Waits for new entries or a mode change; true when the worker should exit.
    ///
    /// A switch to `Drain` returns false, so the caller reads the outbox once
    /// more: entries queued just before the switch arrive together with it,
    /// and `select!` may see the mode change first.
    async fn wait_for_work(&mut self) -> bool {
        tokio::select! {
            changed = self.wake.changed() => changed.is_err(),
            changed = self.mode.changed() => changed.is_err() || *self.mode.borrow() == WorkerMode::Stop,
        }
    }

    /// Sleeps; true when told to stop meanwhile.
    async fn sleep_or_stop(&mut self, delay: Duration) -> bool {
        let mut mode = self.mode.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = mode.wait_for(|m| *m == WorkerMode::Stop) => true,
        }
    }

    fn encode(&mut self, entries: &[(u64, OutboxEntry)], batch: &mut Batch) {
        batch.clear();
        let now = Utc::now();
        for (_, entry) in entries {
            if entry.only_sink.as_deref().is_some_and(|only| only != self.name) {
                continue;
            }
            match Detection::from_json_text(&entry.raw) {
                Ok(detection) => {
                    let outcome = self.encoder.encode(&detection, now, &mut batch.bytes);
                    batch.end_message();
                    if outcome.shortened {
                        tracing::debug!(sink = %self.name, full_id = %detection.full_id().unwrap_or_default(), "event shortened to fit the maximum message size");
                    }
                }
                Err(error) => {
                    let reason = format!("cannot encode: {error}");
                    tracing::warn!(sink = %self.name, tenant = %entry.tenant, reason = %reason, "detection moved to dead letters");
                    if let Err(e) = self.store.dead_letter(&self.name, entry, &reason) {
                        tracing::error!(sink = %self.name, error = %e, "cannot store a dead letter");
                    }
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
            match self.transport.send(batch).await {
                Ok(()) => {
                    if attempt > 1 {
                        tracing::info!(sink = %self.name, attempt, "delivery recovered");
                    }
                    return Ok(Delivery::Done);
                }
                Err(source) => {
                    if self.max_attempts.is_some_and(|max| attempt >= max) {
                        return Err(WorkerError::Send { sink: self.name.clone(), source });
                    }
                    let delay = backoff.next_delay(None);
                    tracing::warn!(
                        sink = %self.name,
                        attempt,
                        retry_in_ms = delay.as_millis() as u64,
                        events = batch.ends.len(),
                        error = %source,
                        "delivery failed; retrying"
                    );
                    if self.sleep_or_stop(delay).await {
                        return Ok(Delivery::Stopped);
                    }
                    attempt += 1;
                }
            }
        }
    }
}
