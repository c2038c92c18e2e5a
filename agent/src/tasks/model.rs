//! Task runtime types: status bitmask, kinds, schedules, specs.

use std::collections::BTreeMap;

/// Task and run states, as bits so that recovery is one predicate:
/// `status & (DOING | QUEUED) != 0`.
pub mod status {
    pub const DEFAULT: u32 = 0;
    pub const SCHEDULED: u32 = 1;
    pub const QUEUED: u32 = 2;
    pub const DOING: u32 = 4;
    pub const DONE: u32 = 8;
    pub const FAILED: u32 = 16;
    pub const ABORTED: u32 = 32;
    pub const CANCELED: u32 = 64;
    /// The run did not do its work, on purpose, and said why (a backup meant for the primary
    /// on a host that is a standby now). Not a failure: no retry, no alert.
    pub const SKIPPED: u32 = 128;
    /// States a restart interrupts.
    pub const IN_FLIGHT: u32 = DOING | QUEUED;
    /// States nothing happens after.
    pub const TERMINAL: u32 = DONE | FAILED | ABORTED | CANCELED | SKIPPED;

    pub fn name(s: u32) -> &'static str {
        match s {
            SCHEDULED => "scheduled",
            QUEUED => "queued",
            DOING => "doing",
            DONE => "done",
            FAILED => "failed",
            ABORTED => "aborted",
            CANCELED => "canceled",
            SKIPPED => "skipped",
            _ => "default",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Vacuum,
    Analyze,
    HealthCheck,
    RetentionCleanup,
    PgDump,
    Sql,
    Command,
    PgbackrestBackup,
    PgbackrestCheck,
    PgbackrestVerify,
    RestoreDrill,
}

pub const KINDS: [Kind; 11] = [
    Kind::Vacuum,
    Kind::Analyze,
    Kind::HealthCheck,
    Kind::RetentionCleanup,
    Kind::PgDump,
    Kind::Sql,
    Kind::Command,
    Kind::PgbackrestBackup,
    Kind::PgbackrestCheck,
    Kind::PgbackrestVerify,
    Kind::RestoreDrill,
];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vacuum => "vacuum",
            Kind::Analyze => "analyze",
            Kind::HealthCheck => "health_check",
            Kind::RetentionCleanup => "retention_cleanup",
            Kind::PgDump => "pg_dump",
            Kind::Sql => "sql",
            Kind::Command => "command",
            Kind::PgbackrestBackup => "pgbackrest_backup",
            Kind::PgbackrestCheck => "pgbackrest_check",
            Kind::PgbackrestVerify => "pgbackrest_verify",
            Kind::RestoreDrill => "restore_drill",
        }
    }

    /// The pgBackRest kinds: granted per stanza by the host's `[backups]` section, and run
    /// only on the role their `run_on` names (else recorded `skipped`).
    pub fn is_backup(self) -> bool {
        matches!(
            self,
            Kind::PgbackrestBackup
                | Kind::PgbackrestCheck
                | Kind::PgbackrestVerify
                | Kind::RestoreDrill
        )
    }

    pub fn parse(s: &str) -> Option<Kind> {
        KINDS.into_iter().find(|k| k.name() == s)
    }

    /// Only idempotent kinds are retried automatically: running them twice is harmless.
    pub fn idempotent(self) -> bool {
        match self {
            Kind::Vacuum
            | Kind::Analyze
            | Kind::HealthCheck
            | Kind::RetentionCleanup
            | Kind::PgDump => true,
            // A failed backup is looked at, not repeated on its own: another attempt at once
            // would load the host and the repository again for the same cause; a check or a
            // verify that failed found something, which a second look finds again.
            Kind::Sql
            | Kind::Command
            | Kind::PgbackrestBackup
            | Kind::PgbackrestCheck
            | Kind::PgbackrestVerify
            | Kind::RestoreDrill => false,
        }
    }

    /// What a run of this kind needs beyond a Postgres login (the agent's role has
    /// `pg_monitor` only): shown when a run fails for want of it, and in the docs.
    pub fn requires(self) -> &'static str {
        match self {
            Kind::Vacuum | Kind::Analyze => {
                "a Postgres role that owns the tables (or the database), or pg_maintain on PostgreSQL 17"
            }
            Kind::HealthCheck => "a Postgres login",
            Kind::PgDump => {
                "a Postgres role that may read what it dumps (e.g. pg_read_all_data) and a path the agent's user may write"
            }
            Kind::Sql => "a Postgres role with the rights the query uses",
            Kind::RetentionCleanup => "nothing: it is the agent's own housekeeping",
            Kind::Command => "the rights of [tasks] run_as, or of the agent's user",
            Kind::PgbackrestBackup
            | Kind::PgbackrestCheck
            | Kind::PgbackrestVerify
            | Kind::RestoreDrill => {
                "[tasks] run_as set to the user pgBackRest runs as (the data directory's owner, usually postgres) and the stanza listed in [backups] stanzas"
            }
        }
    }

    /// The hint to add to a failed run whose output says it lacked a privilege.
    pub fn privilege_hint(self, output: &[u8]) -> Option<String> {
        let text = String::from_utf8_lossy(output).to_lowercase();
        let denied = ["permission denied", "must be owner", "must be superuser"]
            .iter()
            .any(|p| text.contains(p));
        denied.then(|| format!("{} needs {}", self.name(), self.requires()))
    }

    /// Parameters this kind requires, and the ones it accepts.
    pub fn params(self) -> (&'static [&'static str], &'static [&'static str]) {
        match self {
            Kind::Vacuum | Kind::Analyze => {
                (&["database"], &["database", "schema", "table", "full"])
            }
            Kind::HealthCheck => (&[], &["database"]),
            Kind::RetentionCleanup => (&[], &["older_than"]),
            Kind::PgDump => (
                &["database", "path"],
                &["database", "path", "schema", "table"],
            ),
            Kind::Sql => (&["database", "query"], &["database", "query"]),
            Kind::Command => (&[], &[]),
            Kind::PgbackrestBackup => (&["stanza"], &["stanza", "type", "repo", "run_on"]),
            Kind::PgbackrestCheck => (&["stanza"], &["stanza", "run_on"]),
            Kind::PgbackrestVerify => (&["stanza"], &["stanza", "repo", "run_on"]),
            Kind::RestoreDrill => (&["stanza"], &["stanza", "set", "scratch", "check"]),
        }
    }
}

/// When a task runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// Once, at this time (`--at`, `--in`, or now).
    Once { at_ms: i64 },
    /// Every `interval_ms`, first at `first_ms`; never overlapping itself.
    Every { interval_ms: i64, first_ms: i64 },
    /// A five-field cron expression evaluated in an IANA time zone.
    Cron { expr: String, tz: String },
}

impl Schedule {
    /// Human and machine readable form, as shown in task JSON.
    pub fn describe(&self) -> String {
        match self {
            Schedule::Once { .. } => "once".to_string(),
            Schedule::Every { interval_ms, .. } => {
                let d = std::time::Duration::from_millis(u64::try_from(*interval_ms).unwrap_or(0));
                format!("every {}", humantime::format_duration(d))
            }
            Schedule::Cron { expr, tz } => format!("cron {expr} {tz}"),
        }
    }
}

/// What to run. Validated before it reaches the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskSpec {
    pub kind: Kind,
    pub params: BTreeMap<String, String>,
    /// The command's argv (kind `command` only).
    pub argv: Vec<String>,
    pub schedule: Schedule,
    pub timeout_ms: i64,
    /// Operation signature the id derives from.
    pub key: String,
    /// Runs start only inside this window.
    pub window: Option<Window>,
    /// A failed run raises the control plane's `critical_task_failed` alert.
    pub critical: bool,
}

/// A recurring period runs may start in: starts by a cron expression in a time zone (a start
/// in a skipped hour moves to the first instant after it, a repeated hour counts once), each
/// lasting `duration_ms` of elapsed time. No run starts in the last `cutoff_ms`; a run still
/// going `grace_ms` after the end is stopped, when that is set.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub name: String,
    pub cron: String,
    pub tz: String,
    pub duration_ms: i64,
    #[serde(default)]
    pub cutoff_ms: i64,
    #[serde(default)]
    pub grace_ms: Option<i64>,
}

/// Where `now` stands against a task's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowAt {
    /// Open for new runs; the occurrence ends at this time.
    Open { end_ms: i64 },
    /// Closed for new runs (outside it, or past its cutoff) until this time; `None` when the
    /// expression never fires again.
    Closed { opens_ms: Option<i64> },
}

impl Window {
    fn cron(&self) -> Result<super::cron::Cron, String> {
        super::cron::Cron::parse(&self.cron, &self.tz).map_err(|e| format!("window cron: {e}"))
    }

    /// Whether a run may start at `now_ms`, and until or from when.
    pub fn at(&self, now_ms: i64) -> Result<WindowAt, String> {
        let cron = self.cron()?;
        // The first start after (now − duration) is the occurrence in force if it is not
        // after now.
        match cron.next_after_ms(now_ms - self.duration_ms) {
            Some(start) if start <= now_ms => {
                let end_ms = start + self.duration_ms;
                if now_ms < end_ms - self.cutoff_ms {
                    Ok(WindowAt::Open { end_ms })
                } else {
                    Ok(WindowAt::Closed {
                        opens_ms: cron.next_after_ms(now_ms),
                    })
                }
            }
            later => Ok(WindowAt::Closed { opens_ms: later }),
        }
    }

    /// Check the fields: a valid expression, a duration of 1 minute to 24 hours, a cutoff
    /// shorter than the duration, a grace of at most 24 hours.
    pub fn check(&self) -> Result<(), String> {
        const DAY_MS: i64 = 24 * 3_600_000;
        if self.name.is_empty() || self.name.len() > 64 || self.name.chars().any(char::is_control) {
            return Err("window name must be 1 to 64 printable bytes".into());
        }
        self.cron()?;
        if !(60_000..=DAY_MS).contains(&self.duration_ms) {
            return Err("window duration must be between 1m and 24h".into());
        }
        if self.cutoff_ms < 0 || self.cutoff_ms >= self.duration_ms {
            return Err("window cutoff must be shorter than its duration".into());
        }
        if self.grace_ms.is_some_and(|g| !(0..=DAY_MS).contains(&g)) {
            return Err("window grace must be between 0s and 24h".into());
        }
        Ok(())
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOutcome {
    /// One of the terminal status bits.
    pub status: u32,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    pub output: Vec<u8>,
    /// Bytes of output that did not fit the per-run limit and were dropped.
    pub output_dropped_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::Kind;

    #[test]
    fn a_denied_privilege_names_what_the_kind_needs() {
        let hint = Kind::PgDump
            .privilege_hint(b"pg_dump: error: query failed: ERROR:  permission denied for table t");
        assert_eq!(
            hint.as_deref(),
            Some(
                "pg_dump needs a Postgres role that may read what it dumps (e.g. pg_read_all_data) and a path the agent's user may write"
            )
        );
        assert_eq!(Kind::Vacuum.privilege_hint(b"VACUUM"), None);
    }
}
