//! Rate limit for repeated log lines: the same error from the same tenant or
//! sink is logged at most once per window, and the next line that gets
//! through carries how many repeats were left out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys kept before entries older than the window are purged, so a stream of
/// distinct errors cannot grow the map without bound.
const PURGE_AT: usize = 1024;

pub struct RepeatLimiter {
    window: Duration,
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    logged_at: Instant,
    suppressed: u64,
}

impl RepeatLimiter {
    pub fn new(window: Duration) -> Self {
        Self { window, entries: Mutex::new(HashMap::new()) }
    }

    /// Decides whether a line with this key is logged now. Returns the number
    /// of repeats left out since the key was last logged, or `None` when this
    /// line is to be left out.
    pub fn check(&self, key: &str, now: Instant) -> Option<u64> {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if entries.len() >= PURGE_AT {
            let window = self.window;
            entries.retain(|_, entry| now.saturating_duration_since(entry.logged_at) < window);
        }
        match entries.get_mut(key) {
            Some(entry) if now.saturating_duration_since(entry.logged_at) < self.window => {
                entry.suppressed += 1;
                None
            }
            Some(entry) => {
                let suppressed = entry.suppressed;
                entry.logged_at = now;
                entry.suppressed = 0;
                Some(suppressed)
            }
            None => {
                entries.insert(key.to_string(), Entry { logged_at: now, suppressed: 0 });
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_window_are_suppressed_and_counted() {
        let limiter = RepeatLimiter::new(Duration::from_secs(60));
        let start = Instant::now();

        assert_eq!(limiter.check("sink siem: refused", start), Some(0));
        assert_eq!(limiter.check("sink siem: refused", start + Duration::from_secs(1)), None);
        assert_eq!(limiter.check("sink siem: refused", start + Duration::from_secs(59)), None);
        assert_eq!(limiter.check("sink siem: refused", start + Duration::from_secs(61)), Some(2));
        assert_eq!(limiter.check("sink siem: refused", start + Duration::from_secs(62)), None);
    }

    #[test]
    fn different_keys_are_limited_apart() {
        let limiter = RepeatLimiter::new(Duration::from_secs(60));
        let now = Instant::now();

        assert_eq!(limiter.check("tenant a: 503", now), Some(0));
        assert_eq!(limiter.check("tenant b: 503", now), Some(0));
        assert_eq!(limiter.check("tenant a: 503", now), None);
    }

    #[test]
    fn map_is_purged_of_expired_keys() {
        let limiter = RepeatLimiter::new(Duration::from_secs(1));
        let start = Instant::now();
        for i in 0..PURGE_AT {
            limiter.check(&format!("key {i}"), start);
        }

        limiter.check("late", start + Duration::from_secs(5));

        let entries = limiter.entries.lock().unwrap();
        assert_eq!(entries.len(), 1);
        assert!(entries.contains_key("late"));
    }
}
