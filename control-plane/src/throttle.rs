//! Login throttling: after [`FREE_FAILURES`] failed logins in a row for one user name, further
//! attempts for that name are refused without checking the password for a lockout that starts
//! at the configured `login_lockout` (default [`LOCKOUT_FIRST`]) and doubles with each further
//! failure up to [`LOCKOUT_MAX`]. When a lockout ends, one attempt at a time is let through: a
//! success clears the name, a failure locks it again for twice as long. A name with no failure
//! for [`FORGET_AFTER`] (and not locked) starts afresh. Sans-IO (times are passed in).
//!
//! Bounded whatever an attacker sends: names of users that exist have one record each (as many
//! as there are users, which only admins create, and never evicted while they matter); names
//! no user has share a fixed table of [`UNKNOWN_BUCKETS`] records, chosen by a hash keyed per
//! process, so junk names cost no state and cannot push a real user's lockout out.
//! Unknown names lock like known ones (their answers do not tell which names exist).
//!
//! Per replica: N replicas allow N times the attempts. Keyed by name, so an attacker can delay
//! a user's logins, but not guess their password faster than one try per lockout.
//!
//! An attempt counts from the moment it is let through ([`LoginThrottle::begin`]), not from
//! when its password check ends: attempts in flight plus failures never exceed
//! [`FREE_FAILURES`], so a burst of parallel guesses gets no more checks than a sequence. The
//! checks themselves run at most [`LoginThrottle::checks`] at a time (one per core): argon2 is
//! memory- and CPU-hard, and a flood of them must not starve storage or agent heartbeats.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::Duration;

pub const FREE_FAILURES: u32 = 5;
pub const LOCKOUT_FIRST: Duration = Duration::from_secs(30);
pub const LOCKOUT_MAX: Duration = Duration::from_secs(15 * 60);
/// A name whose last failure is this old, and which is not locked, starts afresh.
pub const FORGET_AFTER: Duration = Duration::from_secs(30 * 60);
/// Records shared by the names no user has.
pub const UNKNOWN_BUCKETS: usize = 4096;
/// Known names' records are swept of stale ones when there are more than this.
const KNOWN_SWEEP_AT: usize = 1024;
/// Refused logins written to the audit log per minute and replica; beyond it they are only
/// counted. Anyone can send logins, and with many names the lockout does not bound them.
pub const REFUSALS_AUDITED_PER_MINUTE: u32 = 60;

/// How long a refused attempt is told to wait while other attempts for the name are checked.
pub const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Why an attempt was not let through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The name is locked out for this long.
    Locked(Duration),
    /// The name's free attempts are all being checked; [`BUSY_RETRY`] says when to come back.
    Checking,
}

impl Refusal {
    /// How long the caller is told to wait.
    pub fn retry_after(self) -> Duration {
        match self {
            Refusal::Locked(wait) => wait,
            Refusal::Checking => BUSY_RETRY,
        }
    }
}

/// Whether a login names a user that exists: decides where its failures are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Name<'a> {
    Known(&'a str),
    Unknown(&'a str),
}

#[derive(Clone, Copy, Debug, Default)]
struct Failures {
    count: u32,
    /// Attempts let through whose check has not ended.
    pending: u32,
    last_ms: i64,
    locked_until_ms: i64,
}

impl Failures {
    /// Start afresh when the last failure is old enough and nothing holds the record.
    fn refresh(&mut self, now_ms: i64) {
        let idle_ms = crate::time::duration_ms(FORGET_AFTER);
        if self.pending == 0
            && self.locked_until_ms <= now_ms
            && now_ms.saturating_sub(self.last_ms) > idle_ms
        {
            *self = Failures::default();
        }
    }

    /// A known name's record that holds nothing is not kept.
    fn holds_nothing(&self) -> bool {
        self.count == 0 && self.pending == 0
    }

    /// Attempts that may be checked at once: the free ones left, or one after a lockout.
    fn allowed(&self) -> u32 {
        FREE_FAILURES.saturating_sub(self.count).max(1)
    }
}

struct Table {
    known: BTreeMap<String, Failures>,
    unknown: Vec<Failures>,
}

pub struct LoginThrottle {
    lockout_first: Duration,
    table: Mutex<Table>,
    hasher: RandomState,
    checks: tokio::sync::Semaphore,
    /// (start of the current minute, refusals audited in it).
    audited: Mutex<(i64, u32)>,
}

impl Default for LoginThrottle {
    fn default() -> LoginThrottle {
        LoginThrottle::new(LOCKOUT_FIRST)
    }
}

impl LoginThrottle {
    /// A throttle whose first lockout lasts `lockout_first` (at most [`LOCKOUT_MAX`]).
    pub fn new(lockout_first: Duration) -> LoginThrottle {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        LoginThrottle {
            lockout_first: lockout_first.min(LOCKOUT_MAX),
            table: Mutex::new(Table {
                known: BTreeMap::new(),
                unknown: vec![Failures::default(); UNKNOWN_BUCKETS],
            }),
            hasher: RandomState::new(),
            checks: tokio::sync::Semaphore::new(cores),
            audited: Mutex::new((0, 0)),
        }
    }

    /// The record of `name` (made when missing), refreshed at `now_ms`.
    fn with<T>(&self, name: Name<'_>, now_ms: i64, f: impl FnOnce(&mut Failures) -> T) -> T {
        let mut table = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = match name {
            Name::Known(name) | Name::Unknown(name) => name.to_lowercase(),
        };
        let Name::Known(_) = name else {
            let bucket = self.hasher.hash_one(&key) % UNKNOWN_BUCKETS as u64;
            let record = &mut table.unknown[usize::try_from(bucket).unwrap_or(0)];
            record.refresh(now_ms);
            return f(record);
        };
        let record = table.known.entry(key.clone()).or_default();
        record.refresh(now_ms);
        let answer = f(record);
        if record.holds_nothing() {
            table.known.remove(&key);
        }
        if table.known.len() > KNOWN_SWEEP_AT {
            // Users removed since they failed: their records are dropped once stale.
            table.known.retain(|_, f| {
                f.refresh(now_ms);
                !f.holds_nothing()
            });
        }
        answer
    }

    /// Whether a refused login at `now_ms` may still be written to the audit log this minute
    /// ([`REFUSALS_AUDITED_PER_MINUTE`]); counts it when it may.
    pub fn may_audit_refusal(&self, now_ms: i64) -> bool {
        let mut audited = self
            .audited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let minute = now_ms - now_ms.rem_euclid(60_000);
        if audited.0 != minute {
            *audited = (minute, 0);
        }
        if audited.1 >= REFUSALS_AUDITED_PER_MINUTE {
            return false;
        }
        audited.1 += 1;
        true
    }

    /// The password checks allowed at once (one per core).
    pub fn checks(&self) -> &tokio::sync::Semaphore {
        &self.checks
    }

    /// `Some(wait)` while `name` is locked out.
    pub fn check(&self, name: Name<'_>, now_ms: i64) -> Option<Duration> {
        self.with(name, now_ms, |f| locked_for(f, now_ms))
    }

    /// Let an attempt for `name` through to its password check, counted as pending until
    /// [`failed`](Self::failed), [`succeeded`](Self::succeeded) or [`abandoned`](Self::abandoned);
    /// refused while the name is locked out or its allowed attempts are all being checked.
    pub fn begin(&self, name: Name<'_>, now_ms: i64) -> Result<(), Refusal> {
        self.with(name, now_ms, |f| {
            if let Some(wait) = locked_for(f, now_ms) {
                return Err(Refusal::Locked(wait));
            }
            if f.pending >= f.allowed() {
                return Err(Refusal::Checking);
            }
            f.pending += 1;
            Ok(())
        })
    }

    /// An attempt let through ended without an answer (an error, or the client left).
    pub fn abandoned(&self, name: Name<'_>, now_ms: i64) {
        self.with(name, now_ms, |f| f.pending = f.pending.saturating_sub(1));
    }

    /// A failed attempt; returns the lockout it starts, if any.
    pub fn failed(&self, name: Name<'_>, now_ms: i64) -> Option<Duration> {
        let first = self.lockout_first;
        self.with(name, now_ms, |f| {
            f.pending = f.pending.saturating_sub(1);
            f.count = f.count.saturating_add(1);
            f.last_ms = now_ms;
            if f.count < FREE_FAILURES {
                return None;
            }
            let doublings = (f.count - FREE_FAILURES).min(16);
            let lockout = first.saturating_mul(1 << doublings).min(LOCKOUT_MAX);
            f.locked_until_ms = now_ms.saturating_add(crate::time::duration_ms(lockout));
            Some(lockout)
        })
    }

    /// A successful login clears the name (an unknown name never succeeds).
    pub fn succeeded(&self, name: Name<'_>, now_ms: i64) {
        self.with(name, now_ms, |f| *f = Failures::default());
    }
}

fn locked_for(f: &Failures, now_ms: i64) -> Option<Duration> {
    let left = f.locked_until_ms.saturating_sub(now_ms);
    (left > 0).then(|| Duration::from_millis(u64::try_from(left).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: Name<'static> = Name::Known("Alice");

    #[test]
    fn lockouts_start_after_free_failures_double_and_clear_on_success() {
        let t = LoginThrottle::default();
        for i in 0..FREE_FAILURES - 1 {
            assert_eq!(t.failed(ALICE, i64::from(i)), None);
            assert_eq!(t.check(Name::Known("alice"), i64::from(i)), None);
        }
        assert_eq!(t.failed(ALICE, 10), Some(LOCKOUT_FIRST));
        assert_eq!(t.check(Name::Known("ALICE"), 10), Some(LOCKOUT_FIRST));
        assert_eq!(t.check(ALICE, 10 + 30_000), None, "the lockout ends");
        assert_eq!(t.failed(ALICE, 40_000), Some(LOCKOUT_FIRST * 2));
        assert_eq!(
            t.check(Name::Known("bob"), 40_000),
            None,
            "other names are not affected"
        );
        for i in 0..20 {
            t.failed(ALICE, 50_000 + i);
        }
        assert_eq!(t.check(ALICE, 50_019), Some(LOCKOUT_MAX), "capped");
        t.succeeded(ALICE, 50_020);
        assert_eq!(t.check(ALICE, 50_021), None);
    }

    #[test]
    fn an_ended_lockout_lets_one_attempt_through_at_a_time() {
        let t = LoginThrottle::new(Duration::from_secs(2));
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.begin(ALICE, 0), Ok(()));
            t.failed(ALICE, 0);
        }
        assert_eq!(
            t.begin(ALICE, 1_999),
            Err(Refusal::Locked(Duration::from_millis(1)))
        );
        assert_eq!(t.begin(ALICE, 2_000), Ok(()), "the lockout ended");
        assert_eq!(
            t.begin(ALICE, 2_000),
            Err(Refusal::Checking),
            "one at a time"
        );
        t.succeeded(ALICE, 2_001);
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.begin(ALICE, 2_002), Ok(()), "a success clears it");
        }
        let t = LoginThrottle::new(Duration::from_secs(2));
        for _ in 0..FREE_FAILURES {
            t.failed(ALICE, 0);
        }
        assert_eq!(t.begin(ALICE, 2_000), Ok(()));
        assert_eq!(
            t.failed(ALICE, 2_000),
            Some(Duration::from_secs(4)),
            "doubled"
        );
        assert_eq!(t.begin(ALICE, 6_000), Ok(()), "and it ends again");
    }

    #[test]
    fn attempts_in_flight_count_against_the_free_ones() {
        let t = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.begin(ALICE, 0), Ok(()));
        }
        assert_eq!(
            t.begin(ALICE, 0),
            Err(Refusal::Checking),
            "five are being checked"
        );
        assert_eq!(
            t.begin(Name::Known("bob"), 0),
            Ok(()),
            "other names are not affected"
        );
        t.abandoned(ALICE, 1);
        assert_eq!(
            t.begin(ALICE, 1),
            Ok(()),
            "an abandoned attempt frees its place"
        );
        for _ in 0..FREE_FAILURES - 1 {
            assert_eq!(t.failed(ALICE, 2), None);
        }
        assert_eq!(t.failed(ALICE, 2), Some(LOCKOUT_FIRST));
        assert_eq!(
            t.begin(ALICE, 3),
            Err(Refusal::Locked(LOCKOUT_FIRST - Duration::from_millis(1)))
        );
    }

    #[test]
    fn junk_names_neither_unlock_nor_grow_the_table() {
        let t = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            t.failed(Name::Known("mallory"), 0);
        }
        for i in 0..50_000 {
            t.failed(Name::Unknown(&format!("u{i}")), 1 + i);
        }
        assert!(
            t.check(Name::Known("mallory"), 60_000).is_none(),
            "its lock ended"
        );
        assert_eq!(t.begin(Name::Known("mallory"), 60_000), Ok(()));
        assert_eq!(
            t.failed(Name::Known("mallory"), 60_000),
            Some(LOCKOUT_FIRST * 2),
            "the junk did not reset its count"
        );
        let table = t.table.lock().expect("lock");
        assert_eq!(table.known.len(), 1);
        assert_eq!(table.unknown.len(), UNKNOWN_BUCKETS);
    }

    #[test]
    fn unknown_names_lock_like_known_ones() {
        let t = LoginThrottle::default();
        let ghost = Name::Unknown("ghost");
        for _ in 0..FREE_FAILURES - 1 {
            assert_eq!(t.failed(ghost, 0), None);
        }
        assert_eq!(t.failed(ghost, 0), Some(LOCKOUT_FIRST));
        assert!(t.check(Name::Unknown("GHOST"), 1).is_some());
    }

    #[test]
    fn a_name_idle_long_enough_starts_afresh() {
        let t = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            t.failed(ALICE, 0);
        }
        let later = crate::time::duration_ms(FORGET_AFTER) + 30_001;
        for _ in 0..FREE_FAILURES - 1 {
            assert_eq!(t.failed(ALICE, later), None, "five free failures again");
        }
        assert_eq!(t.with(ALICE, later, |f| f.count), FREE_FAILURES - 1);
    }

    #[test]
    fn refusals_are_audited_up_to_the_budget_each_minute() {
        let t = LoginThrottle::default();
        for _ in 0..REFUSALS_AUDITED_PER_MINUTE {
            assert!(t.may_audit_refusal(120_500));
        }
        assert!(!t.may_audit_refusal(179_999));
        assert!(t.may_audit_refusal(180_000), "a new minute, a new budget");
    }
}
