//! Retry delays: capped exponential backoff with jitter.
//!
//! This is the only module that uses the `backoff` crate, which carries an
//! "unmaintained" advisory, so replacing it touches nothing else.

use std::time::Duration;

use backoff::backoff::Backoff as _;
use backoff::ExponentialBackoff;

/// The longest `Retry-After` honoured; a larger value is capped so that a
/// misbehaving server cannot park a tenant for days.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub struct Backoff {
    inner: ExponentialBackoff,
}

impl Backoff {
    /// Delays start near `initial`, double with ±50 % jitter, and stop growing at `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let inner = ExponentialBackoff {
            current_interval: initial,
            initial_interval: initial,
            randomization_factor: 0.5,
            multiplier: 2.0,
            max_interval: max.max(initial),
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        Self { inner }
    }

    /// The next delay; a server's `Retry-After` wins when it is given.
    pub fn next_delay(&mut self, retry_after: Option<Duration>) -> Duration {
        let computed = self.inner.next_backoff().unwrap_or(self.inner.max_interval);
        match retry_after {
            Some(wait) => wait.min(MAX_RETRY_AFTER),
            None => computed,
        }
    }

    pub fn reset(&mut self) {
        self.inner.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_under_the_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..20).map(|_| backoff.next_delay(None)).collect();
        assert!(delays[0] <= Duration::from_millis(150), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(1500)), "{delays:?}");
        assert!(delays[19] >= Duration::from_millis(500), "{delays:?}");
    }

    #[test]
    fn retry_after_wins_and_is_capped() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(backoff.next_delay(Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(backoff.next_delay(Some(Duration::from_secs(86_400))), MAX_RETRY_AFTER);
    }
}
