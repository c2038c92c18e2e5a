//! Run-time settings of one control-plane process, derived from the validated configuration.
//! Defaults live here and nowhere else.

use std::time::Duration;

use crate::storage::AgentRow;

#[derive(Clone, Debug)]
pub struct Settings {
    /// How often agents send a heartbeat (told to them in `welcome`).
    pub heartbeat_interval: Duration,
    /// Silence after which either side declares the channel dead.
    pub dead_after: Duration,
    /// Lifetime of a login session / API token.
    pub session_ttl: Duration,
    /// Stored metrics older than this are removed (whole days in Postgres) and not accepted.
    pub metrics_retention: Duration,
    /// Audit records older than this are removed (checked hourly).
    pub audit_retention: Duration,
    /// Inventory for fleet exec through the API; `None` turns the exec routes into refusals.
    pub inventory: Option<std::path::PathBuf>,
    /// Mark the session cookie `Secure` (the control plane serves HTTPS).
    pub secure_cookies: bool,
    /// A reverse proxy terminates TLS in front: every connection comes from it.
    pub behind_tls_proxy: bool,
    /// Connections served at once (every agent holds one); more are closed on accept.
    pub max_connections: usize,
    /// Deadline for a request's headers, and for an idle keep-alive connection.
    pub header_timeout: Duration,
    /// Deadline for a request's whole body, counted from when its headers arrived.
    pub body_timeout: Duration,
    /// Deadline for the answer to a request that is not a WebSocket upgrade.
    pub request_timeout: Duration,
    /// Connections served at once from one source address; not applied behind a TLS proxy
    /// (every connection then comes from the proxy, which caps per client itself).
    pub max_connections_per_address: usize,
    /// The first lockout of a user name after repeated failed logins (then doubling, up to
    /// 15 min).
    pub login_lockout: Duration,
    /// Terminal sessions are recorded (on unless the configuration turns it off).
    pub recording: bool,
    /// Terminal recordings whose last event is older than this are removed (checked hourly).
    pub recording_retention: Duration,
    /// What a terminal session does when its recording cannot be stored.
    pub recording_failure: RecordingFailure,
    /// Record every session's keystrokes too (an agent's `[terminal] record_input` asks the
    /// same for its own sessions).
    pub record_input: bool,
    /// The alert loop's timing and grouping.
    pub alerts: AlertTiming,
}

/// How often the alert loop runs, how long its lease lasts, and how notices are grouped.
#[derive(Clone, Copy, Debug)]
pub struct AlertTiming {
    /// How often a replica takes or renews the lease and sends what is due.
    pub tick: Duration,
    /// How often the lease holder evaluates the rules.
    pub evaluate_every: Duration,
    /// A holder that stops renewing loses the lease after this.
    pub lease_ttl: Duration,
    /// How long a transition waits for others of its rule before its notice goes.
    pub group_wait: Duration,
    /// More agents than this in one group make one digest.
    pub digest_over: usize,
    /// A firing alert is notified again after this long.
    pub repeat: Duration,
}

impl Default for AlertTiming {
    fn default() -> AlertTiming {
        // A dead holder's lease lapses within 20 s and the other replica asks every 5 s:
        // taken over within 25 s. First notice: up to 15 s to evaluate, then the group wait.
        AlertTiming {
            tick: Duration::from_secs(5),
            evaluate_every: Duration::from_secs(15),
            lease_ttl: Duration::from_secs(20),
            group_wait: Duration::from_secs(30),
            digest_over: 20,
            repeat: Duration::from_secs(4 * 3600),
        }
    }
}

/// What a terminal session does when its recording cannot be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordingFailure {
    /// The session goes on; the recording is marked incomplete and the user is told.
    FailOpen,
    /// The session is refused or closed, with the reason shown to the user.
    FailClosed,
}

impl RecordingFailure {
    pub fn parse(s: &str) -> Option<RecordingFailure> {
        match s {
            "fail_open" => Some(RecordingFailure::FailOpen),
            "fail_closed" => Some(RecordingFailure::FailClosed),
            _ => None,
        }
    }
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            heartbeat_interval: Duration::from_secs(5),
            dead_after: Duration::from_secs(15),
            session_ttl: Duration::from_secs(12 * 3600),
            metrics_retention: Duration::from_secs(30 * 86_400),
            audit_retention: Duration::from_secs(400 * 86_400),
            inventory: None,
            secure_cookies: false,
            behind_tls_proxy: false,
            max_connections: 20_000,
            header_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(15),
            request_timeout: Duration::from_secs(60),
            max_connections_per_address: 2_000,
            login_lockout: crate::throttle::LOCKOUT_FIRST,
            recording: true,
            recording_retention: Duration::from_secs(90 * 86_400),
            recording_failure: RecordingFailure::FailOpen,
            record_input: false,
            alerts: AlertTiming::default(),
        }
    }
}

impl Settings {
    /// Online = some replica holds the agent's channel *and* heard from it within the dead
    /// deadline. The second half covers a replica that died without clearing `connected`.
    pub fn is_online(&self, row: &AgentRow, now_ms: i64) -> bool {
        let dead_after_ms = crate::time::duration_ms(self.dead_after);
        row.connected
            && row
                .last_seen_ms
                .is_some_and(|seen| now_ms.saturating_sub(seen) <= dead_after_ms)
    }
}
