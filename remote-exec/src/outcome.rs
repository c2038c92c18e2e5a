//! Classification of how an operation ended, and which outcomes may be retried (sans-IO).
//!
//! The rule: anything that ends before the command was sent is `not_started`
//! and certainly did not run; once the exec request is on the wire a dead transport is
//! `uncertain`; the command deadline is `timed_out`; an exit status is `ok` or
//! `command_failed`.

use std::fmt;
use std::time::Duration;

/// The class of an operation's ending.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// Exit status 0.
    Ok,
    /// The command ran and exited non-zero or was killed by a signal.
    CommandFailed,
    /// Connect, handshake, authentication or channel set-up failed: certainly not executed.
    NotStarted,
    /// The transport died after the command was sent: it may have run.
    Uncertain,
    /// The command deadline passed; the remote process was signalled.
    TimedOut,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::CommandFailed => "command_failed",
            Outcome::NotStarted => "not_started",
            Outcome::Uncertain => "uncertain",
            Outcome::TimedOut => "timed_out",
        }
    }

    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::CommandFailed,
        Outcome::NotStarted,
        Outcome::Uncertain,
        Outcome::TimedOut,
    ];
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an operation was when it ended. Each phase has its own timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// TCP connect.
    Connect,
    /// SSH version exchange, key exchange and host key verification.
    Handshake,
    /// User authentication.
    Auth,
    /// Opening a session channel on an established connection.
    Open,
    /// The exec request is on the wire (or answered): the command may be running.
    Running,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Handshake => "handshake",
            Phase::Auth => "auth",
            Phase::Open => "open",
            Phase::Running => "running",
        }
    }
}

/// How an operation ended, before classification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The remote side reported an exit status.
    Exited(u32),
    /// The remote side reported death by a signal.
    Signalled(String),
    /// The server refused the exec request (before anything ran).
    Refused,
    /// The phase's own timeout passed.
    PhaseTimeout,
    /// The link was declared dead: no data and no keepalive answer within the idle timeout.
    LinkDead,
    /// The transport failed or closed (refused connection, reset, EOF, protocol error).
    TransportLost,
    /// The caller canceled the operation.
    Canceled,
}

/// Classify an ending observed in `phase`.
pub fn classify(phase: Phase, end: &End) -> Outcome {
    match (phase, end) {
        (_, End::Exited(0)) => Outcome::Ok,
        (_, End::Exited(_)) | (_, End::Signalled(_)) => Outcome::CommandFailed,
        (_, End::Refused) => Outcome::NotStarted,
        (Phase::Running, End::PhaseTimeout) => Outcome::TimedOut,
        (Phase::Running, End::LinkDead | End::TransportLost | End::Canceled) => Outcome::Uncertain,
        (Phase::Connect | Phase::Handshake | Phase::Auth | Phase::Open, _) => Outcome::NotStarted,
    }
}

/// When a failed attempt is tried again.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry).
    pub attempts_max: u32,
    /// The command is safe to run twice: transport failures after it was sent are retried too.
    pub idempotent: bool,
    /// Pause before the first retry; doubles for each further one.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempts_max: 3,
            idempotent: false,
            backoff: Duration::from_millis(500),
        }
    }
}

impl RetryPolicy {
    /// The pause before attempt `attempt + 1` after `attempt` (1-based) ended with `outcome`,
    /// or `None` when it must not be retried.
    ///
    /// `not_started` is always safe. `uncertain` and `timed_out` are retried only for an
    /// idempotent command. `ok` and `command_failed` are answers from the host, never retried.
    pub fn retry_after(&self, attempt: u32, outcome: Outcome) -> Option<Duration> {
        if attempt >= self.attempts_max {
            return None;
        }
        let safe = match outcome {
            Outcome::NotStarted => true,
            Outcome::Uncertain | Outcome::TimedOut => self.idempotent,
            Outcome::Ok | Outcome::CommandFailed => false,
        };
        safe.then(|| self.backoff.saturating_mul(1 << (attempt - 1).min(6)))
    }
}

#[cfg(test)]
mod tests {
    use super::{End, Outcome, Phase, RetryPolicy, classify};
    use std::time::Duration;

    #[test]
    fn nothing_before_the_exec_request_can_have_run() {
        for phase in [Phase::Connect, Phase::Handshake, Phase::Auth, Phase::Open] {
            for end in [
                End::PhaseTimeout,
                End::LinkDead,
                End::TransportLost,
                End::Canceled,
                End::Refused,
            ] {
                assert_eq!(
                    classify(phase, &end),
                    Outcome::NotStarted,
                    "{phase:?} {end:?}"
                );
            }
        }
    }

    #[test]
    fn after_the_exec_request_a_lost_transport_is_uncertain() {
        assert_eq!(classify(Phase::Running, &End::LinkDead), Outcome::Uncertain);
        assert_eq!(
            classify(Phase::Running, &End::TransportLost),
            Outcome::Uncertain
        );
        assert_eq!(classify(Phase::Running, &End::Canceled), Outcome::Uncertain);
        assert_eq!(
            classify(Phase::Running, &End::PhaseTimeout),
            Outcome::TimedOut
        );
        assert_eq!(classify(Phase::Running, &End::Refused), Outcome::NotStarted);
        assert_eq!(classify(Phase::Running, &End::Exited(0)), Outcome::Ok);
        assert_eq!(
            classify(Phase::Running, &End::Exited(3)),
            Outcome::CommandFailed
        );
        assert_eq!(
            classify(Phase::Running, &End::Signalled("KILL".into())),
            Outcome::CommandFailed
        );
    }

    #[test]
    fn only_safe_outcomes_are_retried_and_attempts_are_capped() {
        let strict = RetryPolicy {
            attempts_max: 3,
            idempotent: false,
            backoff: Duration::from_millis(100),
        };
        assert_eq!(
            strict.retry_after(1, Outcome::NotStarted),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            strict.retry_after(2, Outcome::NotStarted),
            Some(Duration::from_millis(200))
        );
        assert_eq!(strict.retry_after(3, Outcome::NotStarted), None);
        for outcome in [
            Outcome::Uncertain,
            Outcome::TimedOut,
            Outcome::Ok,
            Outcome::CommandFailed,
        ] {
            assert_eq!(strict.retry_after(1, outcome), None, "{outcome}");
        }
        let idempotent = RetryPolicy {
            idempotent: true,
            ..strict
        };
        assert!(idempotent.retry_after(1, Outcome::Uncertain).is_some());
        assert!(idempotent.retry_after(1, Outcome::TimedOut).is_some());
        assert_eq!(idempotent.retry_after(1, Outcome::CommandFailed), None);
    }
}
