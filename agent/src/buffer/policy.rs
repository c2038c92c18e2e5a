//! The rules of metrics delivery, sans-IO: which rows the next read takes, how long to wait
//! after each attempt, and what a `429` asks for. The driver (`delivery`) does the SQLite and
//! HTTP work and asks this after every step.
//!
//! * One batch on the wire at a time; while it is in flight the rows the previous one stored
//!   are deleted and the next one is read and encoded (prefetch). Only a read from scratch
//!   expires stale rows: a prefetch never does, so a row is never both delivered and counted
//!   as dropped.
//! * Delivered: go again at once (the backlog drains as fast as the control plane admits),
//!   with the prefetched batch. Empty: poll again after `idle_poll`. Shed (`429`): wait what
//!   `Retry-After` says, at most [`RETRY_AFTER_MAX`]. Failed: back off with jitter and count a
//!   delivery failure (the heartbeat shows consecutive failures).

use std::time::Duration;

use crate::backoff::Backoff;

/// Longest `Retry-After` honoured.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(60);
/// Wait after a `429` without a readable `Retry-After`.
const RETRY_AFTER_DEFAULT: Duration = Duration::from_secs(1);
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How one attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// The control plane stored the batch and the rows were forgotten.
    Delivered,
    /// Nothing to send.
    Empty,
    /// The control plane shed the batch (`429`) and asked for this wait.
    Shed(Duration),
    /// Anything else: the network, the control plane, the buffer.
    Failed,
}

/// What the driver does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Wait this long before the next attempt.
    pub wait: Duration,
    /// Send the prefetched batch next (else read afresh, expiring stale rows first).
    pub use_prefetched: bool,
    /// Record a delivery failure in the buffer.
    pub record_failure: bool,
}

/// Which rows a read takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    /// Rows with a `seq` above this.
    pub after: i64,
    /// Discard (and count) stale rows first.
    pub expire: bool,
}

#[derive(Clone, Debug)]
pub struct DeliveryPolicy {
    backoff: Backoff,
    idle_poll: Duration,
}

impl DeliveryPolicy {
    pub fn new(idle_poll: Duration) -> DeliveryPolicy {
        DeliveryPolicy {
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
            idle_poll,
        }
    }

    /// The read that starts an attempt with nothing prefetched.
    pub fn fresh_read() -> Read {
        Read {
            after: i64::MIN,
            expire: true,
        }
    }

    /// The read that prefetches while the batch through `in_flight_last_seq` is on the wire.
    pub fn prefetch_read(in_flight_last_seq: i64) -> Read {
        Read {
            after: in_flight_last_seq,
            expire: false,
        }
    }

    /// After an attempt ended as `attempt`; `random` feeds the backoff's jitter (drawn only
    /// for a failure, so a run that never fails draws nothing).
    pub fn after(&mut self, attempt: Attempt, random: impl FnOnce() -> u64) -> Step {
        match attempt {
            Attempt::Delivered => {
                self.backoff.reset();
                Step {
                    wait: Duration::ZERO,
                    use_prefetched: true,
                    record_failure: false,
                }
            }
            Attempt::Empty => Step {
                wait: self.idle_poll,
                use_prefetched: false,
                record_failure: false,
            },
            Attempt::Shed(wait) => Step {
                wait: wait.min(RETRY_AFTER_MAX),
                use_prefetched: false,
                record_failure: false,
            },
            Attempt::Failed => Step {
                wait: self.backoff.next_delay(random()),
                use_prefetched: false,
                record_failure: true,
            },
        }
    }
}

/// The wait a `429`'s `Retry-After` header asks for (whole seconds).
pub fn retry_after(header: Option<&str>) -> Duration {
    header
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(RETRY_AFTER_DEFAULT)
        .min(RETRY_AFTER_MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{Attempt, DeliveryPolicy, RETRY_AFTER_MAX, retry_after};

    const POLL: Duration = Duration::from_millis(250);

    #[test]
    fn delivery_goes_again_at_once_with_the_prefetched_batch() {
        let mut p = DeliveryPolicy::new(POLL);
        let step = p.after(Attempt::Delivered, || 7);
        assert_eq!(step.wait, Duration::ZERO);
        assert!(step.use_prefetched && !step.record_failure);
    }

    #[test]
    fn an_empty_buffer_is_polled_and_not_a_failure() {
        let mut p = DeliveryPolicy::new(POLL);
        let step = p.after(Attempt::Empty, || 7);
        assert_eq!(step.wait, POLL);
        assert!(!step.use_prefetched && !step.record_failure);
    }

    #[test]
    fn failures_back_off_with_a_cap_and_a_delivery_resets_it() {
        let mut p = DeliveryPolicy::new(POLL);
        let waits: Vec<Duration> = (0..12)
            .map(|i| p.after(Attempt::Failed, || i).wait)
            .collect();
        assert!(
            waits.iter().all(|w| *w <= Duration::from_secs(30)),
            "{waits:?}"
        );
        assert!(waits[11] > waits[0], "grows: {waits:?}");
        assert!(p.after(Attempt::Failed, || 1).record_failure);
        p.after(Attempt::Delivered, || 1);
        assert!(p.after(Attempt::Failed, || 1).wait <= Duration::from_millis(500));
    }

    #[test]
    fn shedding_waits_what_the_control_plane_asks_within_bounds() {
        let mut p = DeliveryPolicy::new(POLL);
        let step = p.after(Attempt::Shed(Duration::from_secs(3)), || 0);
        assert_eq!(step.wait, Duration::from_secs(3));
        assert!(
            !step.record_failure,
            "shedding is not a failure of this agent"
        );
        assert_eq!(retry_after(Some("5")), Duration::from_secs(5));
        assert_eq!(retry_after(Some("9999")), RETRY_AFTER_MAX);
        assert_eq!(retry_after(Some("soon")), Duration::from_secs(1));
        assert_eq!(retry_after(None), Duration::from_secs(1));
    }

    #[test]
    fn only_a_fresh_read_expires_rows() {
        assert!(DeliveryPolicy::fresh_read().expire);
        let prefetch = DeliveryPolicy::prefetch_read(41);
        assert_eq!((prefetch.after, prefetch.expire), (41, false));
    }
}
