//! Login throttling: after [`FREE_FAILURES`] failed logins in a row for one user name, further
//! attempts for that name are refused without checking the password for a lockout that
//! doubles from [`LOCKOUT_FIRST`] up to [`LOCKOUT_MAX`]; a successful login clears it. Sans-IO
//! (times are passed in) and bounded ([`NAMES_MAX`] names, the stalest forgotten first).
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
use std::sync::Mutex;
use std::time::Duration;

pub const FREE_FAILURES: u32 = 5;
pub const LOCKOUT_FIRST: Duration = Duration::from_secs(30);
pub const LOCKOUT_MAX: Duration = Duration::from_secs(15 * 60);
pub const NAMES_MAX: usize = 10_000;
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

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    /// Attempts let through whose check has not ended.
    pending: u32,
    last_ms: i64,
    locked_until_ms: i64,
}

pub struct LoginThrottle {
    names: Mutex<BTreeMap<String, Failures>>,
    checks: tokio::sync::Semaphore,
    /// (start of the current minute, refusals audited in it).
    audited: Mutex<(i64, u32)>,
}

impl Default for LoginThrottle {
    fn default() -> LoginThrottle {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        LoginThrottle {
            names: Mutex::new(BTreeMap::new()),
            checks: tokio::sync::Semaphore::new(cores),
            audited: Mutex::new((0, 0)),
        }
    }
}

impl LoginThrottle {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Failures>) -> T) -> T {
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut names)
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
    pub fn check(&self, name: &str, now_ms: i64) -> Option<Duration> {
        self.with(|names| {
            let f = names.get(&name.to_lowercase())?;
            let left = f.locked_until_ms.saturating_sub(now_ms);
            (left > 0).then(|| Duration::from_millis(u64::try_from(left).unwrap_or(0)))
        })
    }

    /// Let an attempt for `name` through to its password check, counted as pending until
    /// [`failed`](Self::failed), [`succeeded`](Self::succeeded) or [`abandoned`](Self::abandoned);
    /// refused while the name is locked out or its free attempts are all taken.
    pub fn begin(&self, name: &str, now_ms: i64) -> Result<(), Refusal> {
        if let Some(wait) = self.check(name, now_ms) {
            return Err(Refusal::Locked(wait));
        }
        self.with(|names| {
            let f = entry(names, name, now_ms);
            if f.count + f.pending >= FREE_FAILURES {
                return Err(Refusal::Checking);
            }
            f.pending += 1;
            f.last_ms = now_ms;
            Ok(())
        })
    }

    /// An attempt let through ended without an answer (an error, or the client left).
    pub fn abandoned(&self, name: &str) {
        self.with(|names| {
            if let Some(f) = names.get_mut(&name.to_lowercase()) {
                f.pending = f.pending.saturating_sub(1);
            }
        });
    }

    /// A failed attempt; returns the lockout it starts, if any.
    pub fn failed(&self, name: &str, now_ms: i64) -> Option<Duration> {
        self.with(|names| {
            let f = entry(names, name, now_ms);
            f.pending = f.pending.saturating_sub(1);
            f.count += 1;
            f.last_ms = now_ms;
            if f.count < FREE_FAILURES {
                return None;
            }
            let doublings = (f.count - FREE_FAILURES).min(16);
            let lockout = LOCKOUT_FIRST
                .saturating_mul(1 << doublings)
                .min(LOCKOUT_MAX);
            f.locked_until_ms = now_ms.saturating_add(crate::time::duration_ms(lockout));
            Some(lockout)
        })
    }

    pub fn succeeded(&self, name: &str) {
        self.with(|names| names.remove(&name.to_lowercase()));
    }
}

/// The record of `name`, made when missing; at the bound the stalest name that is neither
/// locked nor being checked makes room (only when every name is, the stalest of all).
fn entry<'a>(
    names: &'a mut BTreeMap<String, Failures>,
    name: &str,
    now_ms: i64,
) -> &'a mut Failures {
    let key = name.to_lowercase();
    if names.len() >= NAMES_MAX && !names.contains_key(&key) {
        let idle = |f: &Failures| f.pending == 0 && f.locked_until_ms <= now_ms;
        let stalest = names
            .iter()
            .filter(|(_, f)| idle(f))
            .min_by_key(|(_, f)| f.last_ms)
            .or_else(|| names.iter().min_by_key(|(_, f)| f.last_ms))
            .map(|(k, _)| k.clone());
        if let Some(k) = stalest {
            names.remove(&k);
        }
    }
    names.entry(key).or_insert(Failures {
        count: 0,
        pending: 0,
        last_ms: now_ms,
        locked_until_ms: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockouts_start_after_free_failures_double_and_clear_on_success() {
        let t = LoginThrottle::default();
        for i in 0..FREE_FAILURES - 1 {
            assert_eq!(t.failed("Alice", i64::from(i)), None);
            assert_eq!(t.check("alice", i64::from(i)), None);
        }
        assert_eq!(t.failed("alice", 10), Some(LOCKOUT_FIRST));
        assert_eq!(t.check("ALICE", 10), Some(LOCKOUT_FIRST));
        assert_eq!(t.check("alice", 10 + 30_000), None, "the lockout ends");
        assert_eq!(t.failed("alice", 40_000), Some(LOCKOUT_FIRST * 2));
        assert_eq!(t.check("bob", 40_000), None, "other names are not affected");
        for i in 0..20 {
            t.failed("alice", 50_000 + i);
        }
        assert_eq!(t.check("alice", 50_019), Some(LOCKOUT_MAX), "capped");
        t.succeeded("alice");
        assert_eq!(t.check("alice", 50_021), None);
    }

    #[test]
    fn attempts_in_flight_count_against_the_free_ones() {
        let t = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            assert_eq!(t.begin("alice", 0), Ok(()));
        }
        assert_eq!(
            t.begin("alice", 0),
            Err(Refusal::Checking),
            "five are being checked"
        );
        assert_eq!(t.begin("bob", 0), Ok(()), "other names are not affected");
        t.abandoned("alice");
        assert_eq!(
            t.begin("alice", 1),
            Ok(()),
            "an abandoned attempt frees its place"
        );
        for _ in 0..FREE_FAILURES - 1 {
            assert_eq!(t.failed("alice", 2), None);
        }
        assert_eq!(t.failed("alice", 2), Some(LOCKOUT_FIRST));
        assert_eq!(
            t.begin("alice", 3),
            Err(Refusal::Locked(LOCKOUT_FIRST - Duration::from_millis(1)))
        );
    }

    #[test]
    fn a_locked_name_is_not_forgotten_for_idle_ones() {
        let t = LoginThrottle::default();
        for _ in 0..FREE_FAILURES {
            t.failed("mallory", 0);
        }
        for i in 0..NAMES_MAX + 10 {
            t.failed(&format!("u{i}"), 1 + i as i64);
        }
        assert!(t.check("mallory", 20).is_some(), "still locked");
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

    #[test]
    fn the_table_is_bounded() {
        let t = LoginThrottle::default();
        for i in 0..NAMES_MAX + 10 {
            t.failed(&format!("u{i}"), i as i64);
        }
        assert_eq!(t.with(|n| n.len()), NAMES_MAX);
        assert!(t.with(|n| !n.contains_key("u0")), "the stalest went first");
    }
}
