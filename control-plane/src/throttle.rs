//! Login throttling: after [`FREE_FAILURES`] failed logins in a row for one user name, further
//! attempts for that name are refused without checking the password for a lockout that
//! doubles from [`LOCKOUT_FIRST`] up to [`LOCKOUT_MAX`]; a successful login clears it. Sans-IO
//! (times are passed in) and bounded ([`NAMES_MAX`] names, the stalest forgotten first).
//!
//! Per replica: N replicas allow N times the attempts. Keyed by name, so an attacker can delay
//! a user's logins, but not guess their password faster than one try per lockout.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

pub const FREE_FAILURES: u32 = 5;
pub const LOCKOUT_FIRST: Duration = Duration::from_secs(30);
pub const LOCKOUT_MAX: Duration = Duration::from_secs(15 * 60);
pub const NAMES_MAX: usize = 10_000;

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last_ms: i64,
    locked_until_ms: i64,
}

#[derive(Default)]
pub struct LoginThrottle {
    names: Mutex<BTreeMap<String, Failures>>,
}

impl LoginThrottle {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, Failures>) -> T) -> T {
        let mut names = self
            .names
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut names)
    }

    /// `Some(wait)` while `name` is locked out.
    pub fn check(&self, name: &str, now_ms: i64) -> Option<Duration> {
        self.with(|names| {
            let f = names.get(&name.to_lowercase())?;
            let left = f.locked_until_ms.saturating_sub(now_ms);
            (left > 0).then(|| Duration::from_millis(u64::try_from(left).unwrap_or(0)))
        })
    }

    /// A failed attempt; returns the lockout it starts, if any.
    pub fn failed(&self, name: &str, now_ms: i64) -> Option<Duration> {
        self.with(|names| {
            if names.len() >= NAMES_MAX && !names.contains_key(&name.to_lowercase()) {
                let stalest = names
                    .iter()
                    .min_by_key(|(_, f)| f.last_ms)
                    .map(|(k, _)| k.clone());
                if let Some(k) = stalest {
                    names.remove(&k);
                }
            }
            let f = names.entry(name.to_lowercase()).or_insert(Failures {
                count: 0,
                last_ms: now_ms,
                locked_until_ms: 0,
            });
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
    fn the_table_is_bounded() {
        let t = LoginThrottle::default();
        for i in 0..NAMES_MAX + 10 {
            t.failed(&format!("u{i}"), i as i64);
        }
        assert_eq!(t.with(|n| n.len()), NAMES_MAX);
        assert!(t.with(|n| !n.contains_key("u0")), "the stalest went first");
    }
}
