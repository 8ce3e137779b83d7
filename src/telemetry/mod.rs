//! Operational signals of a running forwarder: Prometheus metrics, per-tenant
//! health, the systemd notify protocol, the `/health` and `/metrics` listener,
//! and the rate limit for repeated log lines.
//!
//! The state is process-wide (see [`global`]) because pollers, sink workers
//! and the token source all report into it and a config reload replaces the
//! first two without restarting the process.

pub mod health;
pub mod metrics;
pub mod notify;
pub mod ratelimit;
pub mod server;

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::config::Config;
use crate::pipeline::{CycleError, CycleReport};
use crate::source::SourceError;
use crate::store::Store;
use metrics::{Kind, Metric, Registry};

/// A repeated log line is written at most once per this window.
pub const REPEAT_LOG_WINDOW: Duration = Duration::from_secs(60);

/// Slack added to every progress deadline, for scheduling delays and store
/// writes that the HTTP timeouts do not bound.
const PROGRESS_SLACK: Duration = Duration::from_secs(30);

pub const FETCHED: Metric = Metric { name: "mde_forwarder_detections_fetched_total", help: "Detections read from the API, per tenant.", kind: Kind::Counter };
pub const QUEUED: Metric = Metric { name: "mde_forwarder_detections_queued_total", help: "New detections written to the outbox, per tenant.", kind: Kind::Counter };
pub const DEDUPLICATED: Metric = Metric { name: "mde_forwarder_detections_deduplicated_total", help: "Detections read again and dropped because their FullId was already queued, per tenant.", kind: Kind::Counter };
pub const FORWARDED: Metric = Metric { name: "mde_forwarder_detections_forwarded_total", help: "Detections the sink acknowledged, per sink.", kind: Kind::Counter };
pub const SINK_ERRORS: Metric = Metric { name: "mde_forwarder_sink_errors_total", help: "Failed batch deliveries, per sink; each failure is retried.", kind: Kind::Counter };
pub const POLLS: Metric = Metric { name: "mde_forwarder_polls_total", help: "Completed poll cycles per tenant, by result (ok or error).", kind: Kind::Counter };
pub const POLL_SECONDS_SUM: Metric = Metric { name: "mde_forwarder_poll_duration_seconds_sum", help: "Total seconds spent in successful poll cycles, per tenant; divide by mde_forwarder_polls_total{result=\"ok\"} for the mean.", kind: Kind::Counter };
pub const POLL_SECONDS_LAST: Metric = Metric { name: "mde_forwarder_poll_duration_seconds_last", help: "Seconds the last successful poll cycle took, per tenant.", kind: Kind::Gauge };
pub const LAST_SUCCESS: Metric = Metric { name: "mde_forwarder_last_successful_poll_timestamp_seconds", help: "Unix time of the last successful poll cycle, per tenant.", kind: Kind::Gauge };
pub const API_ERRORS: Metric = Metric { name: "mde_forwarder_api_errors_total", help: "Failed poll attempts per tenant, by HTTP status or by kind (network, malformed, too_large, token, store, paging).", kind: Kind::Counter };
pub const TOKEN_REFRESHES: Metric = Metric { name: "mde_forwarder_token_refreshes_total", help: "Access tokens obtained from the token endpoint, per tenant.", kind: Kind::Counter };
pub const TOKEN_FAILURES: Metric = Metric { name: "mde_forwarder_token_failures_total", help: "Failed token requests, per tenant.", kind: Kind::Counter };
pub const OUTBOX_PENDING: Metric = Metric { name: "mde_forwarder_outbox_pending", help: "Detections queued for the sink and not yet acknowledged, per sink.", kind: Kind::Gauge };
pub const OUTBOX_OLDEST_AGE: Metric = Metric { name: "mde_forwarder_outbox_oldest_detection_age_seconds", help: "Age of the oldest detection queued for the sink, from its LastProcessedTimeUtc, per sink; 0 when nothing is queued.", kind: Kind::Gauge };
pub const OUTBOX_BYTES: Metric = Metric { name: "mde_forwarder_outbox_bytes", help: "Bytes held by the outbox for all sinks.", kind: Kind::Gauge };
pub const CHECKPOINT_LAG: Metric = Metric { name: "mde_forwarder_checkpoint_lag_seconds", help: "Seconds between now and the tenant's checkpoint (LastProcessedTimeUtc of the newest detection read); absent before the first detection.", kind: Kind::Gauge };
pub const DEAD_LETTERS: Metric = Metric { name: "mde_forwarder_dead_letters", help: "Detections kept as dead letters in the store.", kind: Kind::Gauge };
pub const SPOOL_DAMAGED: Metric = Metric { name: "mde_forwarder_spool_damaged_records_total", help: "Outbox batches whose spool record was damaged and that moved to dead letters.", kind: Kind::Counter };
pub const SHORTENED: Metric = Metric { name: "mde_forwarder_events_shortened_total", help: "Events shortened to fit max_datagram_bytes, per sink and by what was lost (optional: other fields; full_id: the FullId was cut or dropped).", kind: Kind::Counter };
pub const RELOADS: Metric = Metric { name: "mde_forwarder_config_reloads_total", help: "Config reloads on SIGHUP, by result (ok or rejected).", kind: Kind::Counter };
pub const UP: Metric = Metric { name: "mde_forwarder_build_info", help: "Always 1; the version label is the running release.", kind: Kind::Gauge };

/// Process-wide telemetry.
pub struct Telemetry {
    pub metrics: Registry,
    pub tenants: health::Tenants,
    pub repeats: ratelimit::RepeatLimiter,
    sinks: Mutex<Vec<String>>,
}

/// Returns the process-wide telemetry state, created on first use.
pub fn global() -> &'static Telemetry {
    static GLOBAL: OnceLock<Telemetry> = OnceLock::new();
    GLOBAL.get_or_init(|| {
        let telemetry = Telemetry {
            metrics: Registry::default(),
            tenants: health::Tenants::default(),
            repeats: ratelimit::RepeatLimiter::new(REPEAT_LOG_WINDOW),
            sinks: Mutex::new(Vec::new()),
        };
        telemetry.metrics.set(&UP, &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
        telemetry
    })
}

/// Returns the maximum time a single step of a poll cycle may take: one
/// request bounded by the HTTP client's timeouts, plus slack.
pub fn poll_step_budget(config: &crate::config::PollConfig) -> Duration {
    Duration::from_secs(config.connect_timeout_secs + config.request_timeout_secs) + PROGRESS_SLACK
}

/// Decides whether a repeated log line is written now; see
/// [`ratelimit::RepeatLimiter::check`]. `key` names the tenant or sink and
/// the error.
pub fn should_log(key: &str) -> Option<u64> {
    global().repeats.check(key, Instant::now())
}

impl Telemetry {
    /// Points health and store gauges at the tenants and sinks of `config`,
    /// at start and after every reload.
    pub fn configure(&self, config: &Config) {
        let names: Vec<String> = config.tenants.iter().map(|t| t.name.clone()).collect();
        let interval = Duration::from_secs(config.poll.interval_secs);
        self.tenants.configure(&names, interval, poll_step_budget(&config.poll), Instant::now());
        let mut sinks = self.sinks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        *sinks = config.sinks.iter().map(|s| s.name().to_string()).collect();
    }

    pub fn poll_succeeded(&self, tenant: &str, report: &CycleReport, duration: Duration) {
        let labels = [("tenant", tenant)];
        self.metrics.add(&FETCHED, &labels, report.fetched as f64);
        self.metrics.add(&QUEUED, &labels, report.queued as f64);
        self.metrics.add(&DEDUPLICATED, &labels, report.duplicates as f64);
        self.metrics.add(&POLLS, &[("tenant", tenant), ("result", "ok")], 1.0);
        self.metrics.add(&POLL_SECONDS_SUM, &labels, duration.as_secs_f64());
        self.metrics.set(&POLL_SECONDS_LAST, &labels, duration.as_secs_f64());
        let wall = Utc::now();
        self.metrics.set(&LAST_SUCCESS, &labels, wall.timestamp() as f64);
        let summary = format!(
            "ok at {}, {} fetched, {} new, {} duplicates",
            wall.format("%Y-%m-%dT%H:%M:%SZ"),
            report.fetched,
            report.queued,
            report.duplicates
        );
        self.tenants.poll_succeeded(tenant, summary, Instant::now(), wall);
    }

    /// Counts one failed attempt of a poll cycle and shows its error in
    /// `/health` while the cycle retries.
    pub fn poll_attempt_failed(&self, tenant: &str, error: &CycleError) {
        self.metrics.add(&API_ERRORS, &[("tenant", tenant), ("status", &error_label(error))], 1.0);
        self.tenants.poll_attempt_failed(tenant, error.to_string());
    }

    /// Records a poll cycle that failed after its retries.
    pub fn poll_failed(&self, tenant: &str, error: &CycleError) {
        self.metrics.add(&POLLS, &[("tenant", tenant), ("result", "error")], 1.0);
        self.tenants.poll_failed(tenant, error.to_string());
    }

    pub fn token_fetched(&self, tenant: &str, ok: bool) {
        let metric = if ok { &TOKEN_REFRESHES } else { &TOKEN_FAILURES };
        self.metrics.add(metric, &[("tenant", tenant)], 1.0);
    }

    pub fn beat(&self, tenant: &str, within: Duration) {
        self.tenants.beat(tenant, within, Instant::now());
    }

    /// Reads the gauges that live in the store: outbox depth and age per
    /// sink, checkpoint lag per tenant, dead letters.
    ///
    /// The outbox gauges cover the configured sinks and every removed sink
    /// whose backlog the store keeps, so an alert on them includes that backlog.
    pub fn collect_store_gauges(&self, store: &Store) {
        let now = Utc::now();
        let mut sinks = self.sinks.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        match store.cursors() {
            Ok(cursors) => {
                for (name, _) in cursors {
                    if !sinks.contains(&name) {
                        sinks.push(name);
                    }
                }
            }
            Err(e) => {
                if let Some(suppressed) = should_log(&format!("cursor list: {e}")) {
                    tracing::warn!(error = %e, suppressed, "cannot list the sink cursors for /metrics");
                }
            }
        }
        self.metrics.clear(&OUTBOX_PENDING);
        self.metrics.clear(&OUTBOX_OLDEST_AGE);
        for sink in &sinks {
            let labels = [("sink", sink.as_str())];
            match store.pending(sink) {
                Ok((count, oldest)) => {
                    self.metrics.set(&OUTBOX_PENDING, &labels, count as f64);
                    let age = oldest.and_then(|seq| oldest_age(store, seq, now)).unwrap_or(0.0);
                    self.metrics.set(&OUTBOX_OLDEST_AGE, &labels, age);
                }
                Err(e) => tracing::warn!(sink = %sink, error = %e, "cannot read the outbox depth for /metrics"),
            }
        }
        self.metrics.set(&OUTBOX_BYTES, &[], store.outbox_bytes() as f64);
        self.metrics.clear(&CHECKPOINT_LAG);
        for tenant in &self.tenants.names() {
            if let Ok(Some(checkpoint)) = store.checkpoint(tenant) {
                let lag = (now - checkpoint).num_milliseconds() as f64 / 1000.0;
                self.metrics.set(&CHECKPOINT_LAG, &[("tenant", tenant.as_str())], lag.max(0.0));
            }
        }
        self.metrics.set(&DEAD_LETTERS, &[], store.dead_letter_count() as f64);
    }
}

/// Seconds since the LastProcessedTimeUtc of the outbox entry `seq`.
fn oldest_age(store: &Store, seq: u64, now: chrono::DateTime<Utc>) -> Option<f64> {
    let (_, entry) = store.read_after(seq.saturating_sub(1), 1).ok()?.into_iter().next()?;
    let time = entry.detection().last_processed()?;
    Some(((now - time).num_milliseconds() as f64 / 1000.0).max(0.0))
}

/// Returns the `status` label of an API error: the HTTP status, or the kind of
/// failure when there was no HTTP response from the API.
fn error_label(error: &CycleError) -> String {
    match error {
        CycleError::Source(source) => match source {
            SourceError::Auth(_) => "token".into(),
            SourceError::Network { .. } => "network".into(),
            SourceError::Malformed { .. } => "malformed".into(),
            SourceError::TooLarge { .. } => "too_large".into(),
            other => other.status().map(|s| s.to_string()).unwrap_or_else(|| "other".into()),
        },
        CycleError::Store { .. } => "store".into(),
        CycleError::PagingStuck { .. } | CycleError::PagingUnreadable { .. } => "paging".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detection::Detection;

    /// A removed sink whose backlog the store keeps has outbox gauges, so an
    /// alert on `outbox_pending` includes detections no sink delivers.
    #[tokio::test]
    async fn removed_sink_backlog_in_gauges() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.sync_cursors(&["kept", "removed"]).unwrap();
        let detection = Detection::from_json_text(r#"{"FullId":"g:1","LastProcessedTimeUtc":"2026-01-01T00:00:00Z"}"#).unwrap();
        store.enqueue("t", vec![detection], None, Utc::now()).await.unwrap();
        store.sync_cursors(&["kept"]).unwrap();

        let telemetry = Telemetry {
            metrics: Registry::default(),
            tenants: health::Tenants::default(),
            repeats: ratelimit::RepeatLimiter::new(REPEAT_LOG_WINDOW),
            sinks: Mutex::new(vec!["kept".to_string()]),
        };
        telemetry.collect_store_gauges(&store);
        assert_eq!(telemetry.metrics.value(&OUTBOX_PENDING, &[("sink", "kept")]), Some(1.0));
        assert_eq!(telemetry.metrics.value(&OUTBOX_PENDING, &[("sink", "removed")]), Some(1.0));
        assert!(telemetry.metrics.value(&OUTBOX_OLDEST_AGE, &[("sink", "removed")]).is_some_and(|age| age > 0.0));

        // Once dropped, the removed sink's series disappear at the next scrape.
        store.drop_sink("removed").unwrap();
        telemetry.collect_store_gauges(&store);
        assert_eq!(telemetry.metrics.value(&OUTBOX_PENDING, &[("sink", "removed")]), None);
    }
}
