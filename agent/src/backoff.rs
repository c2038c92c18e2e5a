//! Capped exponential backoff with jitter, as a plain state machine: the caller supplies
//! the randomness, so the policy is deterministic under test and simulation.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).max(1);
        Backoff {
            base_ms,
            max_ms: u64::try_from(max.as_millis())
                .unwrap_or(u64::MAX)
                .max(base_ms),
            failures: 0,
        }
    }

    /// The longest delay [`Backoff::next_delay`] can ever return.
    pub fn max(&self) -> Duration {
        Duration::from_millis(self.max_ms)
    }

    /// Failures since the last [`Backoff::reset`].
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Record a failure and return how long to wait before the next attempt: uniformly in
    /// `[ceiling/2, ceiling]` where `ceiling = min(max, base * 2^failures)` ("equal jitter":
    /// spread out, yet never hammering with near-zero delays).
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let shift = self.failures.min(32);
        let ceiling = self.base_ms.saturating_mul(1u64 << shift).min(self.max_ms);
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let spread = ceiling - half;
        Duration::from_millis(half + random % (spread + 1))
    }

    /// A connection succeeded: start again from the base delay.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let mut b = Backoff::new(ms(100), ms(1000));
        // random = u64::MAX % (spread+1) varies; use 0 for the lower edge, huge for near-upper.
        let lows: Vec<_> = (0..6).map(|_| b.next_delay(0)).collect();
        assert_eq!(
            lows,
            vec![ms(50), ms(100), ms(200), ms(400), ms(500), ms(500)]
        );
        b.reset();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.next_delay(50), ms(100));
    }

    #[test]
    fn never_exceeds_the_cap_whatever_the_randomness() {
        let mut b = Backoff::new(ms(250), ms(5000));
        for r in 0..10_000u64 {
            let d = b.next_delay(r.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert!(d <= b.max(), "{d:?}");
            assert!(d >= ms(125), "{d:?}");
        }
    }

    #[test]
    fn survives_huge_failure_counts() {
        let mut b = Backoff::new(ms(1), Duration::from_secs(3600));
        for _ in 0..200 {
            b.next_delay(7);
        }
        assert!(b.next_delay(u64::MAX) <= Duration::from_secs(3600));
    }
}
