//! The one jittered exponential back-off every reconnecting client uses (Watch,
//! Registration, enrolment retries): each wait doubles up to a ceiling, and is spread by
//! ±20% so that many clients cut off at once do not come back at once.

use std::time::Duration;

/// First wait after a failure.
pub const DEFAULT_MIN: Duration = Duration::from_millis(200);
/// Longest wait between attempts.
pub const DEFAULT_MAX: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_MIN, DEFAULT_MAX)
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The wait before the next attempt (jittered), doubling the one after it.
    pub fn next_delay(&mut self) -> Duration {
        let jitter = rand::random::<f64>() * 0.4 + 0.8;
        let d = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// The un-jittered wait the next attempt would get (for logs).
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// After a success: start again from the shortest wait.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Sleeps [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        let bases = [100u64, 200, 350, 350, 350];
        for (w, base) in waits.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *w >= base.mul_f64(0.79) && *w <= base.mul_f64(1.21),
                "{w:?} not within 20% of {base:?}"
            );
        }
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }
}
