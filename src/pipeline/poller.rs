//! One tenant's poll loop: query the window, queue new detections, advance the
//! checkpoint once the whole window is covered.
//!
//! Pages of a window are queued as they stream in (each batch in its own
//! flushed transaction with its dedupe entries), and the checkpoint moves in
//! a last transaction only after every page arrived. A crash in between leaves
//! the checkpoint where it was, so the next cycle reads the window again and
//! the dedupe set absorbs what was already queued.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{OutboxFullPolicy, PollConfig, StateConfig};
use crate::retry::Backoff;
use crate::source::{AlertsClient, Element, Query, SourceError};
use crate::detection::Detection;
use crate::store::{EnqueueOutcome, Store, StoreError};

/// Detections read from a response before they are queued together.
const QUEUE_BATCH: usize = 250;

/// Batches split and waiting to be queued, at most.
const QUEUE_DEPTH: usize = 2;

/// One tick of the API's clock (100 ns). Every window starts one tick before
/// How far a stored checkpoint may be ahead of the local clock before the
/// poller reads from now instead: clocks of two machines differ by seconds.
const FUTURE_CHECKPOINT_SLACK: chrono::Duration = chrono::Duration::minutes(5);

/// `checkpoint - overlap`, so detections stamped exactly at the checkpoint are
/// read again whether the API treats `sinceTimeUtc` as inclusive or not.
const TICK: chrono::Duration = chrono::Duration::nanoseconds(100);

#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("tenant {tenant}: state store failed: {source}")]
    Store { tenant: String, source: StoreError },
    #[error("tenant {tenant}: {count} or more detections share LastProcessedTimeUtc {time}, more than limit = {count} (the tenant's or [poll]) can page through; raise limit or set it to 0")]
    PagingStuck { tenant: String, count: u32, time: String },
    #[error("tenant {tenant}: a full page of {count} detections had no readable LastProcessedTimeUtc, so older pages cannot be requested; set limit = 0 (the tenant's or [poll])")]
    PagingUnreadable { tenant: String, count: u32 },
}

impl CycleError {
    pub fn is_retryable(&self) -> bool {
        match self {
            CycleError::Source(e) => e.is_retryable(),
            CycleError::Store { .. } => true,
            CycleError::PagingStuck { .. } | CycleError::PagingUnreadable { .. } => false,
        }
    }

    /// Returns whether Azure AD or the API rejected the credentials
    /// themselves, which only an operator can fix.
    pub fn is_credential_rejection(&self) -> bool {
        matches!(
            self,
            CycleError::Source(SourceError::Auth(crate::auth::AuthError::Rejected { .. }))
                | CycleError::Source(SourceError::Unauthorized { .. })
        )
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            CycleError::Source(e) => e.retry_after(),
            _ => None,
        }
    }
}

/// Counts and window of one poll cycle.
#[derive(Debug, Default, Clone)]
pub struct CycleReport {
    pub since: Option<DateTime<Utc>>,
    pub fetched: usize,
    pub queued: usize,
    pub duplicates: usize,
    pub invalid: usize,
    pub pages: usize,
    pub checkpoint: Option<DateTime<Utc>>,
}

pub struct Poller {
    pub(crate) client: AlertsClient,
    pub(crate) store: Arc<Store>,
    pub(crate) poll: PollConfig,
    pub(crate) state: StateConfig,
    pub(crate) wake_sinks: Arc<watch::Sender<u64>>,
}

impl Poller {
    fn name(&self) -> &str {
        &self.client.tenant().name
    }

    fn store_error(&self, source: StoreError) -> CycleError {
        CycleError::Store { tenant: self.name().to_string(), source }
    }

    /// The daemon loop: a cycle every interval until `stop` turns true.
    ///
    /// Rejected credentials do not fix themselves, so each rejection in a row
    /// doubles the wait (see [`rejection_delay`]); a successful cycle resets it.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let interval = Duration::from_secs(self.poll.interval_secs);
        let mut rejections = 0u32;
        loop {
            if !self.wait_for_outbox_room(&mut stop).await {
                return;
            }
            let started = tokio::time::Instant::now();
            self.beat(Duration::ZERO);
            let mut cycle_stop = stop.clone();
            let result = tokio::select! {
                result = self.run_with_retries(&mut cycle_stop) => result,
                _ = stop.wait_for(|s| *s) => return,
            };
            let wait = match result {
                Ok(_) => {
                    rejections = 0;
                    interval
                }
                Err(error) if error.is_credential_rejection() => {
                    rejections = rejections.saturating_add(1);
                    let wait = rejection_delay(interval, rejections);
                    tracing::warn!(
                        tenant = %self.name(),
                        rejections,
                        next_attempt_secs = wait.as_secs(),
                        "credentials rejected {rejections} time(s) in a row; waiting longer before the next attempt. Check tenant_id, client_id and that the secret or certificate is the one in the app registration and has not expired"
                    );
                    wait
                }
                Err(_) => interval,
            };
            super::release_free_memory();
            let next = started + wait;
            self.beat(next.saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Tells the watchdog this poller is alive and its next step ends within
    /// `wait` plus one request's time.
    fn beat(&self, wait: Duration) {
        crate::telemetry::global().beat(self.name(), wait + crate::telemetry::poll_step_budget(&self.poll));
    }

    /// Runs one cycle, retried with backoff while the error is retryable.
    pub async fn run_with_retries(&self, stop: &mut watch::Receiver<bool>) -> Result<CycleReport, CycleError> {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.poll.retry_initial_ms),
            Duration::from_secs(self.poll.retry_max_secs),
        );
        let mut attempt = 1;
        loop {
            let started = std::time::Instant::now();
            match self.run_cycle().await {
                Ok(report) => {
                    crate::telemetry::global().poll_succeeded(self.name(), &report, started.elapsed());
                    tracing::info!(
                        tenant = %self.name(),
                        since = %report.since.map(crate::timefmt::format_query).unwrap_or_default(),
                        fetched = report.fetched,
                        queued = report.queued,
                        duplicates = report.duplicates,
                        invalid = report.invalid,
                        pages = report.pages,
                        checkpoint = %report.checkpoint.map(crate::timefmt::format_api_time).unwrap_or_default(),
                        duration_ms = started.elapsed().as_millis() as u64,
                        "poll complete"
                    );
                    return Ok(report);
                }
                Err(error) if error.is_retryable() && attempt < self.poll.retry_max_attempts => {
                    crate::telemetry::global().poll_attempt_failed(self.name(), &error);
                    let delay = backoff.next_delay(error.retry_after());
                    if let Some(suppressed) = crate::telemetry::should_log(&format!("poll retry {}: {error}", self.name())) {
                        tracing::warn!(
                            tenant = %self.name(),
                            attempt,
                            retry_in_ms = delay.as_millis() as u64,
                            error = %error,
                            suppressed,
                            "poll failed; retrying"
                        );
                    }
                    self.beat(delay);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|s| *s) => return Err(error),
                    }
                    attempt += 1;
                }
                Err(error) => {
                    let telemetry = crate::telemetry::global();
                    telemetry.poll_attempt_failed(self.name(), &error);
                    telemetry.poll_failed(self.name(), &error);
                    if let Some(suppressed) = crate::telemetry::should_log(&format!("poll failed {}: {error}", self.name())) {
                        tracing::error!(tenant = %self.name(), attempt, error = %error, suppressed, "poll failed; the checkpoint did not move");
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Reads the whole window once and queues what is new.
    pub async fn run_cycle(&self) -> Result<CycleReport, CycleError> {
        let now = Utc::now();
        let tenant = self.client.tenant();
        let mut checkpoint = self.store.checkpoint(&tenant.name).map_err(|e| self.store_error(e))?;
        if let Some(ahead) = checkpoint.filter(|c| *c > now + FUTURE_CHECKPOINT_SLACK) {
            // A checkpoint ahead of the clock (a clock set back, or a time
            // stored before set-checkpoint checked it) would read nothing
            // until then. It is moved back to now, so polls go on from here.
            tracing::error!(
                tenant = %tenant.name,
                checkpoint = %crate::timefmt::format_api_time(ahead),
                "the checkpoint was ahead of this machine's clock and is moved back to now; check the clock, and replay earlier detections with `state set-checkpoint` if needed"
            );
            self.store.set_checkpoint(&tenant.name, Some(now)).map_err(|e| self.store_error(e))?;
            checkpoint = Some(now);
        }
        let since = match checkpoint {
            Some(c) => c - chrono::Duration::seconds(self.poll.overlap_secs as i64) - TICK,
            None => now - chrono::Duration::seconds(self.poll.initial_lookback_secs as i64),
        };
        let limit = tenant.limit.unwrap_or(self.poll.limit);
        let mut query = Query {
            since: Some(since),
            until: None,
            ago: None,
            limit,
            machine_groups: tenant.machine_groups.clone(),
            device_created_machine_tags: tenant.device_created_machine_tags.clone(),
            cloud_created_machine_tags: tenant.cloud_created_machine_tags.clone(),
        };
        let mut report = CycleReport { since: Some(since), ..CycleReport::default() };
        let mut newest: Option<DateTime<Utc>> = None;
        let mut previous_oldest: Option<DateTime<Utc>> = None;
        loop {
            let page = self.read_page(&query, now, &mut report).await?;
            report.pages += 1;
            newest = newest.max(page.newest);
            if limit == 0 || (page.count as u64) < limit as u64 {
                break;
            }
            // A full page: the API returned the most recent `limit` detections,
            // so older ones may be missing. Ask for the part before this page.
            let Some(oldest) = page.oldest else {
                return Err(CycleError::PagingUnreadable { tenant: tenant.name.clone(), count: limit });
            };
            // No progress: every detection of the page shares the previous
            // page's oldest tick, so a smaller `until` would skip some.
            if previous_oldest.is_some_and(|previous| oldest >= previous) {
                return Err(CycleError::PagingStuck {
                    tenant: tenant.name.clone(),
                    count: limit,
                    time: crate::timefmt::format_query(oldest),
                });
            }
            previous_oldest = Some(oldest);
            // `untilTimeUtc` has whole ticks; rounding up (never down) keeps a
            // detection stamped between two ticks inside the next page.
            query.until = Some(crate::timefmt::ceil_tick(oldest));
        }
        // A timestamp in the future (a skewed or hostile record) must not move
        // the checkpoint past detections that have not happened yet.
        let new_checkpoint = newest.map(|t| t.min(now));
        self.store
            .enqueue(&tenant.name, Vec::new(), new_checkpoint, now)
            .await
            .map_err(|e| self.store_error(e))?;
        report.checkpoint = self.store.checkpoint(&tenant.name).map_err(|e| self.store_error(e))?;
        Ok(report)
    }

    /// Reads one response and queues its detections.
    ///
    /// Queuing batches (spool append, dedupe lookups, fsyncs) runs on a
    /// thread of the blocking pool while the next batches are read and
    /// decoded, so the two overlap. Batches are queued in response order. An
    /// error waits for the batches already split to be queued before it is
    /// returned. A poller stopped or reloaded mid-page leaves those batches
    /// being queued, and the store's per-tenant lock keeps the next poller
    /// of the tenant from deciding what is new while one of them is.
    async fn read_page(&self, query: &Query, now: DateTime<Utc>, report: &mut CycleReport) -> Result<PageSummary, CycleError> {
        let mut page = self.client.open(query).await?;
        let mut summary = PageSummary::default();
        let (batches, queuing) = self.start_queuing(now);
        let read: Result<(), CycleError> = loop {
            let elements = match page.next_batch(QUEUE_BATCH).await {
                Ok(Some(elements)) => elements,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.into()),
            };
            self.beat(Duration::ZERO);
            let detections = match self.sort_elements(elements, now, &mut summary, report) {
                Ok(detections) => detections,
                Err(e) => break Err(e),
            };
            report.fetched += detections.len();
            // A closed channel means queuing failed; its error comes below.
            if batches.send(detections).await.is_err() {
                break Ok(());
            }
        };
        drop(batches);
        let settled = self.settle_queuing(queuing, report).await;
        read?;
        settled?;
        Ok(summary)
    }

    /// Starts a thread that queues the batches sent to it, in order, and
    /// wakes the sinks after each flushed transaction. Up to `QUEUE_DEPTH`
    /// batches wait, so the poller splits the next ones while earlier ones
    /// are written and synced. Batches that waited are merged until they
    /// reach twice `QUEUE_BATCH` (so fewer than three times), to save a
    /// flush and its fsyncs. The thread ends when the sender is dropped,
    /// after the batches sent so far, or at the first error.
    fn start_queuing(
        &self,
        now: DateTime<Utc>,
    ) -> (tokio::sync::mpsc::Sender<Vec<Detection>>, JoinHandle<Result<EnqueueOutcome, StoreError>>) {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Vec<Detection>>(QUEUE_DEPTH);
        let store = self.store.clone();
        let tenant = self.name().to_string();
        let wake_sinks = self.wake_sinks.clone();
        let queuing = tokio::task::spawn_blocking(move || {
            let mut total = EnqueueOutcome::default();
            while let Some(mut detections) = receiver.blocking_recv() {
                while detections.len() < QUEUE_BATCH * 2 {
                    match receiver.try_recv() {
                        Ok(more) => detections.extend(more),
                        Err(_) => break,
                    }
                }
                let outcome = store.enqueue_blocking(&tenant, detections, None, now)?;
                total.queued += outcome.queued;
                total.duplicates += outcome.duplicates;
                if outcome.queued > 0 {
                    wake_sinks.send_modify(|generation| *generation += 1);
                }
            }
            Ok(total)
        });
        (sender, queuing)
    }

    /// Splits a batch of response elements into detections, updating the
    /// page's time range, and keeps each new invalid element as a dead letter.
    fn sort_elements(
        &self,
        elements: Vec<Element>,
        now: DateTime<Utc>,
        summary: &mut PageSummary,
        report: &mut CycleReport,
    ) -> Result<Vec<Detection>, CycleError> {
        let tenant = self.name();
        let mut detections = Vec::with_capacity(elements.len());
        for element in elements {
            summary.count += 1;
            match element {
                Element::Detection(d) => {
                    if let Some(t) = d.last_processed() {
                        summary.oldest = Some(summary.oldest.map_or(t, |o| o.min(t)));
                        summary.newest = summary.newest.max(Some(t));
                    }
                    detections.push(d);
                }
                Element::Invalid { raw, reason } => {
                    report.invalid += 1;
                    // A broken element may have taken in the detections after
                    // it, so the FullIds in its text are named.
                    let full_ids = embedded_full_ids(&raw);
                    let named = match full_ids.len() {
                        0 => String::new(),
                        _ => format!("; its text contains FullId {}", full_ids.join(", ")),
                    };
                    let letter_reason = format!("response element is not a detection: {reason}{named}");
                    let new = self.store.keep_invalid(tenant, &raw, &letter_reason, now).map_err(|e| self.store_error(e))?;
                    if new && full_ids.len() > 1 {
                        tracing::error!(
                            tenant = %tenant,
                            reason = %reason,
                            full_ids = %listed_full_ids(&full_ids),
                            "response element is not a detection and its text contains several FullIds, so it may have taken in the detections after it; kept as a dead letter, replay its window with `state set-checkpoint --resend` once the API sends it whole"
                        );
                    } else if new {
                        tracing::warn!(tenant = %tenant, reason = %reason, full_ids = %listed_full_ids(&full_ids), "response element is not a detection; kept as a dead letter");
                    }
                }
            }
        }
        Ok(detections)
    }

    /// Waits for the queuing thread to finish the batches sent to it, and
    /// counts them.
    async fn settle_queuing(
        &self,
        queuing: JoinHandle<Result<EnqueueOutcome, StoreError>>,
        report: &mut CycleReport,
    ) -> Result<(), CycleError> {
        let outcome = match queuing.await {
            Ok(outcome) => outcome.map_err(|e| self.store_error(e))?,
            Err(join) => match join.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                // Only a runtime shutdown cancels a blocking task.
                Err(_) => return Err(self.store_error(StoreError::Cancelled)),
            },
        };
        report.queued += outcome.queued;
        report.duplicates += outcome.duplicates;
        Ok(())
    }

    /// Pauses polling while the outbox is over its limit. Returns false when
    /// stopped while waiting.
    async fn wait_for_outbox_room(&self, stop: &mut watch::Receiver<bool>) -> bool {
        let limit = self.state.max_outbox_bytes;
        let mut warned = false;
        while self.store.outbox_bytes() >= limit {
            if self.state.on_outbox_full == OutboxFullPolicy::DropOldest {
                // When nothing could be dropped, the outbox is full all the
                // same: wait below as the pause policy does, instead of
                // trying again at once.
                match self.store.drop_oldest(limit - limit / 10) {
                    Ok(dropped) if dropped.count > 0 => {
                        let time = |t: Option<DateTime<Utc>>| t.map(crate::timefmt::format_api_time).unwrap_or_else(|| "unknown".into());
                        tracing::error!(
                            tenant = %self.name(),
                            dropped = dropped.count,
                            from_tenants = %dropped.tenants.join(","),
                            last_processed_from = %time(dropped.window.map(|w| w.0)),
                            last_processed_to = %time(dropped.window.map(|w| w.1)),
                            "outbox reached max_outbox_bytes; dropped the oldest undelivered detections (on_outbox_full = \"drop_oldest\"). Once the sinks catch up, replay them with `state set-checkpoint --tenant NAME --time FROM --resend`"
                        );
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(tenant = %self.name(), error = %e, "cannot drop from the full outbox"),
                }
            }
            if !warned {
                let slowest = self.store.cursors().ok().and_then(|c| c.first().map(|(name, _)| name.clone()));
                tracing::warn!(
                    tenant = %self.name(),
                    outbox_bytes = self.store.outbox_bytes(),
                    max_outbox_bytes = limit,
                    sink = %slowest.unwrap_or_default(),
                    "outbox is full; polling paused until this sink catches up (if it is no longer in the config, configure it again or drop its backlog with `state drop-sink`)"
                );
                warned = true;
            }
            self.beat(Duration::from_millis(500));
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.wait_for(|s| *s) => return false,
            }
        }
        if warned {
            tracing::info!(tenant = %self.name(), "outbox has room again; polling resumes");
        }
        true
    }
}

/// Maximum wait between attempts while credentials keep being rejected.
const MAX_REJECTION_DELAY: Duration = Duration::from_secs(3600);

/// Returns the wait after the `rejections`-th credential rejection in a row.
/// It starts at twice the poll interval and doubles up to one hour, but is
/// never less than the interval itself.
pub fn rejection_delay(interval: Duration, rejections: u32) -> Duration {
    let factor = 1u32.checked_shl(rejections.min(31)).unwrap_or(u32::MAX);
    interval.saturating_mul(factor).min(MAX_REJECTION_DELAY).max(interval)
}

#[derive(Default)]
struct PageSummary {
    count: usize,
    oldest: Option<DateTime<Utc>>,
    newest: Option<DateTime<Utc>>,
}

/// Returns the values of every `"FullId"` key in `raw`, at any depth and
/// whatever the alignment of its strings: a key is any quoted text that
/// reads `FullId` once decoded (`"Full\u0049d"` included) and is followed
/// by a colon. A string value is given decoded. One that cannot be decoded
/// is given as written, with bytes that are not UTF-8 replaced. Another
/// value's text runs up to the next `,`, `}` or `]`. For an element that is
/// not valid JSON, which no parser can read.
fn embedded_full_ids(raw: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    for start in memchr::memchr_iter(b'"', raw) {
        let Some(key) = quoted_at(raw, start, MAX_KEY_BYTES) else { continue };
        let is_key = key == b"\"FullId\""
            || (key.contains(&b'\\') && crate::detection::decode_json_string(key).as_deref() == Some("FullId"));
        if !is_key {
            continue;
        }
        let rest = raw[start + key.len()..].trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b":").map(<[u8]>::trim_ascii_start) else { continue };
        let value = if rest.first() == Some(&b'"') {
            match quoted_at(rest, 0, usize::MAX) {
                Some(string) => crate::detection::decode_json_string(string)
                    .unwrap_or_else(|| String::from_utf8_lossy(&string[1..string.len() - 1]).into_owned()),
                // Not closed: the text to the end.
                None => String::from_utf8_lossy(&rest[1..]).into_owned(),
            }
        } else {
            let end = rest.iter().position(|b| matches!(b, b',' | b'}' | b']')).unwrap_or(rest.len());
            String::from_utf8_lossy(rest[..end].trim_ascii_end()).into_owned()
        };
        if !value.is_empty() {
            found.push(visible(&value));
        }
    }
    found
}

/// Escapes control characters (`\n` as `\\n`, others as `\\u{..}`), so a
/// decoded value cannot split a log line or a reason.
fn visible(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The maximum length of `"FullId"` spelled with escapes: six `\uXXXX`
/// escapes and the quotes.
const MAX_KEY_BYTES: usize = 6 * 6 + 2;

/// Returns the quoted text that opens at `raw[start]`, quotes included,
/// when it closes within `max` bytes; a backslash escapes the byte after it.
fn quoted_at(raw: &[u8], start: usize, max: usize) -> Option<&[u8]> {
    let text = &raw[start..];
    let mut end = 1;
    while end < text.len().min(max) {
        match text[end] {
            b'"' => return Some(&text[..=end]),
            b'\\' => end += 2,
            _ => end += 1,
        }
    }
    None
}

/// Lists `full_ids` for a log line: the first ten, and how many more.
fn listed_full_ids(full_ids: &[String]) -> String {
    const MAX_LOGGED: usize = 10;
    let first = full_ids[..full_ids.len().min(MAX_LOGGED)].join(", ");
    match full_ids.len().checked_sub(MAX_LOGGED) {
        Some(more) if more > 0 => format!("{first} and {more} more (all in the dead letter's reason)"),
        _ => first,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_full_ids_found_at_any_depth() {
        let broken = br#"{"FullId": "r2", "X":[1,2,{"FullId":"v2","T":"a\"b"},{"FullId" : "v\"3"}}"#;
        assert_eq!(embedded_full_ids(broken), ["r2", "v2", r#"v"3"#]);
        assert_eq!(embedded_full_ids(br#"{"FullId":42,"Title":"x"}"#), ["42"]);
        assert_eq!(embedded_full_ids(br#"{"FullId":"cut"#), ["cut"]);
        let escaped = br#"{"Full\u0049d": "e\u0031", "X": [{"\u0046\u0075\u006c\u006c\u0049\u0064":"e2"}, {"FullId":"a\nb"}, {"FullId":"\ud800"}]"#;
        assert_eq!(embedded_full_ids(escaped), ["e1", "e2", "a\\nb", "\\ud800"]);
        // A string left open does not hide the key after it, and text inside
        // a string is no key.
        assert_eq!(embedded_full_ids(br#"{"T":"open, "FullId":"x"}"#), ["x"]);
        assert_eq!(embedded_full_ids(br#"{"T":"x\"FullId\":\"in\"", "FullId":"after"}"#), ["after"]);
        let many: String = (0..25).map(|i| format!(r#"{{"FullId":"v{i}"}},"#)).collect();
        let found = embedded_full_ids(many.as_bytes());
        assert_eq!(found.len(), 25, "every FullId is listed");
        assert!(listed_full_ids(&found).ends_with("v9 and 15 more (all in the dead letter's reason)"), "{}", listed_full_ids(&found));
    }

    #[test]
    fn rejection_delay_doubles_up_to_an_hour() {
        let minute = Duration::from_secs(60);
        let cases = [(1, 120), (2, 240), (3, 480), (5, 1920), (6, 3600), (40, 3600)];
        for (rejections, secs) in cases {
            assert_eq!(rejection_delay(minute, rejections), Duration::from_secs(secs), "{rejections}");
        }
    }

    #[test]
    fn rejection_delay_never_shortens_a_long_interval() {
        let two_hours = Duration::from_secs(7200);
        assert_eq!(rejection_delay(two_hours, 3), two_hours);
    }
}

