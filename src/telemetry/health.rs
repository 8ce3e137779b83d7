//! Per-tenant liveness: the last poll result (for `/health` and the systemd
//! STATUS line) and a progress deadline per poller (for the watchdog).
//!
//! A poller reports progress with [`Tenants::beat`], naming how long its next
//! step may take at most (a request bounded by the HTTP timeouts, a retry
//! delay, the sleep until the next interval). A tenant whose deadline passed
//! has a poll loop that hangs, and the watchdog keep-alive is withheld.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

/// A tenant is healthy while its last successful poll is at most this many
/// intervals old.
pub const HEALTHY_INTERVALS: u32 = 3;

#[derive(Debug, Clone)]
struct TenantState {
    interval: Duration,
    started: Instant,
    last_success: Option<(Instant, DateTime<Utc>)>,
    last_result: Option<String>,
    last_error: Option<String>,
    progress_deadline: Instant,
}

/// The configured tenants' states.
#[derive(Default)]
pub struct Tenants {
    states: Mutex<BTreeMap<String, TenantState>>,
}

/// The outcome and JSON body of `/health`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    pub healthy: bool,
    pub body: Value,
}

impl Tenants {
    /// Replaces the tenant set after a start or reload. Tenants that stay keep
    /// their history; new ones get `first_step` to show their first progress.
    pub fn configure(&self, names: &[String], interval: Duration, first_step: Duration, now: Instant) {
        let mut states = self.lock();
        states.retain(|name, _| names.contains(name));
        for name in names {
            let state = states.entry(name.clone()).or_insert_with(|| TenantState {
                interval,
                started: now,
                last_success: None,
                last_result: None,
                last_error: None,
                progress_deadline: now + first_step,
            });
            state.interval = interval;
            state.progress_deadline = state.progress_deadline.max(now + first_step);
        }
    }

    /// Records that `tenant`'s poller made progress and expects its next step
    /// to end within `within`.
    pub fn beat(&self, tenant: &str, within: Duration, now: Instant) {
        if let Some(state) = self.lock().get_mut(tenant) {
            state.progress_deadline = now + within;
        }
    }

    pub fn poll_succeeded(&self, tenant: &str, summary: String, now: Instant, wall: DateTime<Utc>) {
        if let Some(state) = self.lock().get_mut(tenant) {
            state.last_success = Some((now, wall));
            state.last_result = Some(summary);
            state.last_error = None;
        }
    }

    /// Records the error of an attempt that is retried.
    pub fn poll_attempt_failed(&self, tenant: &str, error: String) {
        if let Some(state) = self.lock().get_mut(tenant) {
            state.last_result = Some(format!("retrying after: {}", one_line(&error)));
            state.last_error = Some(error);
        }
    }

    pub fn poll_failed(&self, tenant: &str, error: String) {
        if let Some(state) = self.lock().get_mut(tenant) {
            state.last_result = Some(format!("failed: {}", one_line(&error)));
            state.last_error = Some(error);
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Tenants whose poller passed its progress deadline.
    pub fn stalled(&self, now: Instant) -> Vec<String> {
        self.lock().iter().filter(|(_, s)| now > s.progress_deadline).map(|(name, _)| name.clone()).collect()
    }

    /// 200 while every tenant polled successfully within the last
    /// [`HEALTHY_INTERVALS`] intervals, else 503 with the reason per tenant.
    pub fn health(&self, now: Instant) -> HealthReport {
        let states = self.lock();
        let mut healthy = !states.is_empty();
        let mut tenants = serde_json::Map::new();
        for (name, state) in states.iter() {
            let limit = state.interval * HEALTHY_INTERVALS;
            let age = state.last_success.map(|(at, _)| now.saturating_duration_since(at));
            let ok = age.is_some_and(|age| age <= limit);
            healthy &= ok;
            let mut entry = json!({
                "healthy": ok,
                "last_success": state.last_success.map(|(_, wall)| crate::timefmt::format_query(wall)),
                "last_error": state.last_error,
            });
            if !ok {
                let reason = match age {
                    Some(age) => format!("last successful poll was {} s ago, more than {HEALTHY_INTERVALS} intervals ({} s)", age.as_secs(), limit.as_secs()),
                    None => format!("no successful poll in the {} s since the pipeline started", now.saturating_duration_since(state.started).as_secs()),
                };
                entry["reason"] = Value::String(reason);
            }
            tenants.insert(name.clone(), entry);
        }
        let status = if healthy { "ok" } else { "unhealthy" };
        HealthReport { healthy, body: json!({ "status": status, "tenants": tenants }) }
    }

    /// Builds the systemd STATUS text: the last poll result per tenant.
    pub fn status_line(&self) -> String {
        let states = self.lock();
        let parts: Vec<String> = states
            .iter()
            .map(|(name, s)| format!("{name}: {}", s.last_result.as_deref().unwrap_or("not polled yet")))
            .collect();
        parts.join("; ")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, TenantState>> {
        self.states.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn one_line(text: &str) -> String {
    let line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if line.chars().count() > 200 {
        line.chars().take(200).collect::<String>() + "..."
    } else {
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(60);
    const STEP: Duration = Duration::from_secs(30);

    fn tenants(names: &[&str], now: Instant) -> Tenants {
        let tenants = Tenants::default();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        tenants.configure(&names, INTERVAL, STEP, now);
        tenants
    }

    #[test]
    fn health_needs_a_recent_success_for_every_tenant() {
        let start = Instant::now();
        let tenants = tenants(&["contoso", "fabrikam"], start);

        assert!(!tenants.health(start).healthy, "no poll yet");
        tenants.poll_succeeded("contoso", "ok".into(), start, Utc::now());
        let report = tenants.health(start);
        assert!(!report.healthy);
        assert_eq!(report.body["tenants"]["contoso"]["healthy"], true);
        assert!(report.body["tenants"]["fabrikam"]["reason"].as_str().unwrap().contains("no successful poll"));

        tenants.poll_succeeded("fabrikam", "ok".into(), start, Utc::now());
        assert!(tenants.health(start + INTERVAL * 3).healthy);
        let late = tenants.health(start + INTERVAL * 3 + Duration::from_secs(1));
        assert!(!late.healthy);
        assert!(late.body["tenants"]["contoso"]["reason"].as_str().unwrap().contains("181 s ago"));
    }

    #[test]
    fn failed_poll_shows_error_until_next_success() {
        let now = Instant::now();
        let tenants = tenants(&["contoso"], now);

        tenants.poll_failed("contoso", "tenant contoso: HTTP 503\nbusy".into());
        assert_eq!(tenants.health(now).body["tenants"]["contoso"]["last_error"], "tenant contoso: HTTP 503\nbusy");
        assert_eq!(tenants.status_line(), "contoso: failed: tenant contoso: HTTP 503 busy");

        tenants.poll_succeeded("contoso", "ok, 3 fetched".into(), now, Utc::now());
        assert_eq!(tenants.health(now).body["tenants"]["contoso"]["last_error"], Value::Null);
        assert_eq!(tenants.status_line(), "contoso: ok, 3 fetched");
    }

    #[test]
    fn retried_attempt_shows_its_error() {
        let now = Instant::now();
        let tenants = tenants(&["contoso"], now);

        tenants.poll_attempt_failed("contoso", "tenant contoso: HTTP 429\nslow down".into());
        assert_eq!(tenants.health(now).body["tenants"]["contoso"]["last_error"], "tenant contoso: HTTP 429\nslow down");
        assert_eq!(tenants.status_line(), "contoso: retrying after: tenant contoso: HTTP 429 slow down");

        tenants.poll_succeeded("contoso", "ok, 1 fetched".into(), now, Utc::now());
        assert_eq!(tenants.health(now).body["tenants"]["contoso"]["last_error"], Value::Null);
    }

    #[test]
    fn poller_past_its_deadline_is_stalled() {
        let start = Instant::now();
        let tenants = tenants(&["contoso", "fabrikam"], start);

        assert!(tenants.stalled(start + STEP).is_empty());
        tenants.beat("contoso", Duration::from_secs(100), start);
        assert_eq!(tenants.stalled(start + STEP + Duration::from_secs(1)), ["fabrikam"]);
        assert_eq!(tenants.stalled(start + Duration::from_secs(101)), ["contoso", "fabrikam"]);
    }

    #[test]
    fn reconfigure_keeps_history_and_drops_removed_tenants() {
        let start = Instant::now();
        let tenants = tenants(&["contoso", "fabrikam"], start);
        tenants.poll_succeeded("contoso", "ok".into(), start, Utc::now());

        tenants.configure(&["contoso".to_string(), "northwind".to_string()], INTERVAL, STEP, start);

        let report = tenants.health(start);
        assert_eq!(report.body["tenants"]["contoso"]["healthy"], true);
        assert!(report.body["tenants"].get("fabrikam").is_none());
        assert_eq!(report.body["tenants"]["northwind"]["healthy"], false);
    }
}
